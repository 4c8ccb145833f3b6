"""Which spatial frequencies does a generator give every video? (README 'Does it learn?', 'The cause')

    python benchmarks/frequencies.py quality/runs/quality               # every checkpoint of a run
    python benchmarks/frequencies.py quality/runs/quality/step-00001250 # one checkpoint
    python benchmarks/frequencies.py CKPT --swap xyaffine               # the initial frequency predictor put back
    python benchmarks/frequencies.py image-baseline/snapshots --init-seed 0 model.fourier_lr_mult=1.0 model.supersample=2

For every CoordFuser (one per synthesis block on a new grid) and N seeded videos (the seeds `generate` and
`quality.py` use), the per-video frequencies W_xy = fourier_scale * xyaffine(w) [N, E, 2] in rad per unit
of the [-1, 1] frame:
- `shared`: |mean over the videos of W_xy| of each of the E features, largest first (the frequency every
  video gets, a stripe shared by all of them once it is large);
- `median`: the median over videos and features of |W_xy| (what a single video's frequencies look like);
- `w_mean_norm`, `w_std`: |E w| and the mean per-dimension std of the mapped codes w.
`--swap PART` (`xyaffine`: every CoordFuser's frequency predictor; `mapping`: the mapping network) first puts
the initial network's PART into the G (the main job's initial weights: seeded by the checkpoint's
`train.seed`), to tell which part moved the shared frequencies. The first row is the initial G itself.
Prints one JSON object per row. Plain state dicts (`benchmarks/image_baseline.py`'s `snapshots/kimg-*.pt`)
carry no config: give the run's `--config` and overrides, and `--init-seed 0` (that benchmark's seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from digan.config import add_config_args, config_from_args  # noqa: E402

SWAPS = {"xyaffine": lambda name: ".xyaffine." in f".{name}", "mapping": lambda name: name.startswith("mapping.")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run folder (every checkpoint with a generator.pt), a checkpoint folder or file")
    add_config_args(p, default="demo-32")  # the config of plain state dicts (an export carries its own)
    p.add_argument("--videos", type=int, default=64, help="N seeded videos (default: 64)")
    p.add_argument("--seed", type=int, default=42, help="seeds of the videos: seed .. seed+N-1 (default: 42)")
    p.add_argument("--swap", choices=sorted(SWAPS), help="put the initial G's part into each G first")
    p.add_argument("--init-seed", type=int, help="seed of the initial G (default: the config's train.seed)")
    p.add_argument("--top", type=int, default=3, help="how many of the largest shared frequencies (default: 3)")
    return p.parse_intermixed_args(argv)


def generator_files(path: Path) -> list[Path]:
    """A file or checkpoint folder (its generator.pt), a run folder's checkpoints in training order, or a
    snapshots folder's kimg-*.pt."""
    from digan.models import find_generator_file

    if path.is_file() or (path / "generator.pt").is_file():
        return [find_generator_file(path)]
    files = sorted(path.glob("*/generator.pt")) or sorted(path.glob("kimg-*.pt"))
    if not files:
        raise SystemExit(f"{path}: no generator.pt in it or in its checkpoint folders, and no kimg-*.pt")
    return files


def load(file: Path, cfg) -> tuple[float, torch.nn.Module, object]:
    """(kimg, G, its config) of a generator export, or of a plain state dict (then with `cfg`); one read."""
    from digan.config import from_dict
    from digan.models import build_generator, generator_from_export

    payload = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and "G_ema" in payload and "config" in payload:
        cfg = from_dict(payload["config"])
        return float(payload["kimg"]), generator_from_export(payload, cfg, file), cfg
    G = build_generator(cfg.model).eval()
    try:
        G.load_state_dict(payload)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise SystemExit(f"{file}: neither a generator export nor a state dict of this config's G ({str(e)[:200]})")
    return float(file.stem.split("-")[-1]) if file.stem.startswith("kimg-") else float("nan"), G, cfg


def initial_generator(cfg, seed: int | None) -> torch.nn.Module:
    """The initial G: the global RNG seeded (the main job: with train.seed), then the generator built first."""
    from digan.distributed.utils import seed_everything
    from digan.models import build_generator

    seed_everything(cfg.train.seed if seed is None else seed)
    return build_generator(cfg.model).eval()


@torch.no_grad()
def frequency_row(G: torch.nn.Module, seeds: list[int], top: int) -> dict:
    from digan.sampling import seed_latents

    z, z_motion = seed_latents(seeds, G.z_dim, G.motion_z_dim)
    code = G.prepare(z, z_motion)
    w = code.w if code.w.dim() == 2 else code.w[:, 0]
    row = {"w_mean_norm": round(w.mean(0).norm().item(), 3), "w_std": round(w.std(0).mean().item(), 3)}
    for name, block in G.blocks.items():
        if block.coord_fuser is None:
            continue
        w_xy = code.blocks[name]["fuser"][0]  # [N, E, 2]
        shared = w_xy.mean(0).norm(dim=1).sort(descending=True).values
        row[name] = {"shared": [round(v, 2) for v in shared[:top].tolist()],
                     "median": round(w_xy.norm(dim=2).median().item(), 2)}
    return row


def swapped(G: torch.nn.Module, init: torch.nn.Module, part: str) -> torch.nn.Module:
    """G with the initial network's parameters of `part` (same architecture) put in."""
    state = G.state_dict()
    picked = {k: v for k, v in init.state_dict().items() if SWAPS[part](k)}
    if not picked:
        raise SystemExit(f"--swap {part}: no parameter of this generator matches")
    state.update(picked)
    G.load_state_dict(state)
    return G


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    files = generator_files(Path(args.path))
    if args.dry_run:
        print(json.dumps({"generators": [str(f) for f in files], "videos": args.videos, "swap": args.swap}))
        return 0
    from digan.sampling import video_seeds

    seeds = video_seeds(args.seed, args.videos)
    loaded = [load(f, cfg) for f in files]
    init = initial_generator(loaded[0][2], args.init_seed)
    print(json.dumps({"kimg": 0.0, "generator": "initial", **frequency_row(init, seeds, args.top)}))
    for file, (kimg, G, _) in zip(files, loaded):
        if args.swap:
            G = swapped(G, init, args.swap)
        row = {"kimg": kimg, "generator": str(file), "swap": args.swap}
        print(json.dumps({**row, **frequency_row(G, seeds, args.top)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
