"""DIGAN models: the INR video generator, the image and motion discriminators, and the G_ema export.

    G = build_generator(cfg.model)                  # G(z, z_motion, t [B, T], scale) -> [B, T, 3, H, W]
    D_img, D_mot = build_discriminators(cfg.model)  # D_img([N, 3, H, W]) / D_mot(motion_input(pair, dt))
    save_generator(path, G_ema, cfg, step, kimg)    # generator.pt = {config, G_ema, step, kimg}
    G_ema, cfg = load_generator(run_or_checkpoint_dir_or_file)
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from digan.config import Config, ModelConfig, from_dict, to_dict
from digan.models.discriminator import ImageDiscriminator, MotionDiscriminator, motion_input
from digan.models.generator import Generator, VideoCode
from digan.storage import atomic_write

__all__ = ["Generator", "VideoCode", "ImageDiscriminator", "MotionDiscriminator", "motion_input",
           "build_generator", "build_discriminators", "save_generator", "load_generator",
           "find_generator_file", "read_generator_export", "generator_from_export", "GENERATOR_FILE"]

GENERATOR_FILE = "generator.pt"


def build_generator(cfg: ModelConfig) -> Generator:
    """The DIGAN generator for a model config (all block structure is derived from it)."""
    return Generator(cfg)


def build_discriminators(cfg: ModelConfig) -> tuple[ImageDiscriminator, MotionDiscriminator]:
    """(D_I, D_M): separate weights, same hyper-parameters (official `OurDiscriminator`)."""
    return ImageDiscriminator(cfg), MotionDiscriminator(cfg)


# ----------------------------------------------------------------------------------------------------
# The inference export read by digan.generate / digan.evaluate.


def save_generator(path: str | os.PathLike, G_ema: Generator, cfg: Config, step: int, kimg: float) -> Path:
    """Write `{"config", "G_ema", "step", "kimg"}` atomically (temp file in the same folder + rename).

    `path` is the file or a checkpoint folder (then `generator.pt` inside it). Tensors are saved detached on
    the CPU, so the file loads with `torch.load(..., weights_only=True)` on any machine.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / GENERATOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": to_dict(cfg),
        "G_ema": {k: v.detach().to("cpu", copy=True) for k, v in G_ema.state_dict().items()},
        "step": int(step),
        "kimg": float(kimg),
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def _last_int(name: str) -> int:
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else -1


def find_generator_file(path: str | os.PathLike) -> Path:
    """Resolve a file, a checkpoint folder, or a run / `checkpoints` folder to one `generator.pt`.

    For a folder without `generator.pt` of its own, the latest checkpoint below it (up to 3 levels deep) is
    taken: the one whose folder name ends in the largest number (`step-00001200`, `checkpoint_000012`),
    ties broken by modification time.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / GENERATOR_FILE).is_file():
        return path / GENERATOR_FILE
    found = [p for depth in ("*", "*/*", "*/*/*") for p in path.glob(f"{depth}/{GENERATOR_FILE}")]
    if not found:
        raise FileNotFoundError(f"no {GENERATOR_FILE} in {str(path)!r} or its checkpoint folders")
    return max(found, key=lambda p: (_last_int(p.parent.name), p.stat().st_mtime))


def _why_unreadable(file: Path, error: Exception) -> str:
    """What is wrong with a file torch.load refused, in a few words (torch's own text runs to many lines)."""
    with open(file, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04" and not head.startswith(b"\x80\x02"):
        return f"not a torch.save file (it starts with {head!r}, not a ZIP archive)"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds Python objects other than tensors and plain containers (not a generator.pt export)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"damaged, truncated or not a PyTorch archive ({type(error).__name__}: {first.split('. ')[0].rstrip('.')})"


def read_generator_export(path_or_dir: str | os.PathLike,
                          map_location: str | torch.device = "cpu") -> tuple[Path, dict, Config]:
    """Resolve and read a `generator.pt` export (file, checkpoint folder or run folder): (file, payload, cfg).

    Whatever is wrong ends in one exception with one line that names the file: FileNotFoundError (nothing
    there) or ValueError (not a torch file, damaged, another kind of checkpoint, a bad config inside).
    """
    file = find_generator_file(path_or_dir)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: not a readable generator checkpoint: {_why_unreadable(file, e)}") from None
    if not isinstance(payload, dict) or "config" not in payload or "G_ema" not in payload:
        found = f"keys {sorted(map(str, payload))[:6]}" if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{file}: not a generator export (expected keys 'config' and 'G_ema', found {found})")
    try:
        cfg = from_dict(payload["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{file}: the config inside is not valid here: {str(e).splitlines()[0]}") from None
    return file, payload, cfg


def generator_from_export(payload: dict, cfg: Config, file: Path,
                          map_location: str | torch.device = "cpu") -> Generator:
    """The generator of a read export, in eval mode with gradients off (ValueError if weights and config differ)."""
    G = build_generator(cfg.model)
    sd, own = payload["G_ema"], G.state_dict()
    if not isinstance(sd, dict):
        raise ValueError(f"{file}: G_ema is a {type(sd).__name__}, not a state dict")
    # Checked here, in one line: torch's load_state_dict error lists every mismatched key.
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & sd.keys() if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise ValueError(f"{file}: its G_ema weights do not fit the model its config describes ({len(missing)} "
                         f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape; e.g. {example})")
    G.load_state_dict(sd)
    return G.to(map_location).eval().requires_grad_(False)


def load_generator(path_or_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Generator, Config]:
    """Load `(G_ema, cfg)` from a `generator.pt`, a checkpoint folder, or a run folder (latest checkpoint).

    The generator is returned in eval mode with gradients off. Errors: see `read_generator_export`.
    """
    file, payload, cfg = read_generator_export(path_or_dir, map_location)
    return generator_from_export(payload, cfg, file, map_location), cfg
