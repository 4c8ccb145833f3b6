"""Does it learn? Train a preset on the embedded real footage, then measure real FVD16 along the way.

    python benchmarks/quality.py                                   # demo-32, 100 kimg (1-1.5 h on 2 cores)
    python benchmarks/quality.py --kimg 40 --every 5 --out /tmp/q  # a shorter look
    python benchmarks/quality.py --config demo-32 loss.r1_schedule=folded --out quality-folded
    python benchmarks/quality.py --eval-only --out DIR             # (re)evaluate the checkpoints of DIR

1. Training is the main job itself (`python -m digan.train`, its Ray workers and DeepSpeed engines), run to
   each evaluation point in turn (`--early` points, then every `--every` kimg), each segment resuming from
   the previous one's checkpoint, every checkpoint kept; the kimg/hour figure is the jobs' own wall time,
   start-ups included (~1 min a segment on 2 cores). A resumed segment starts a fresh data epoch.
2. Every checkpoint's G_ema is then scored with real FVD16: the TF-Hub I3D (`tfhub` protocol), N fake
   videos (codes from `--seed`, the same videos at every point) against N real clips of the data. The floor
   line is the FVD between two disjoint sets of N real clips: what a perfect generator would score at this N.
   The real clips are the data's own (the demo has no held-out split: its ~370 clips are overlapping
   windows of 3 videos and pans over 8 photos, so a held-out clip would overlap training clips anyway).
3. Outputs in `--out`: `quality.csv` (kimg, fvd16, the floor, N, seeds, protocol, detector, wall time),
   `curve.png` (FVD vs kimg with the floor), `grids/kimg-XXXX.png` (the same `--grid-seeds` videos at each
   point, frames left to right) and `progress.png` (one row per point, the first grid seed's frames).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from digan.config import add_config_args, config_from_args  # noqa: E402

RUN_NAME = "quality"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(p, default="demo-32")
    p.add_argument("--kimg", type=float, default=100.0,
                   help="training length in kimg (default: 100; 76-108 kimg/hour measured on 2 cores)")
    p.add_argument("--every", type=float, default=20.0, help="evaluation points every this many kimg (default: 20)")
    p.add_argument("--early", default="2,5,10", help="earlier evaluation points in kimg (default: 2,5,10; '' = none)")
    p.add_argument("--num-videos", type=int, default=64, help="N fake and N real clips per FVD (default: 64)")
    p.add_argument("--seed", type=int, default=42, help="codes of the fake videos and order of the real clips")
    p.add_argument("--grid-seeds", default="0,1,2,3", help="videos shown in the frame grids (default: 0,1,2,3)")
    p.add_argument("--grid-frames", type=int, default=8, help="frames per video in the grids (default: 8)")
    p.add_argument("--out", default="quality", help="output folder (default: ./quality)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the checkpoints in --out")
    return p.parse_args(argv)


def schedule(args: argparse.Namespace) -> list[float]:
    """The kimg of every evaluation point: the early ones, then every `--every`, then the end."""
    pts = {float(x) for x in args.early.split(",") if x.strip()} | {args.kimg}
    k = args.every
    while k < args.kimg - 1e-9:
        pts.add(round(k, 6))
        k += args.every
    return sorted(p for p in pts if 0 < p <= args.kimg)


def train(args: argparse.Namespace, out: Path) -> float:
    """Run the main job to each evaluation point (resuming each time); returns the jobs' wall time in seconds."""
    total = 0.0
    for point in schedule(args):
        overrides = list(args.overrides) + [
            f"train.total_kimg={point:g}", f"train.checkpoint_kimg={args.kimg:g}", f"train.sample_kimg={args.kimg:g}",
            "train.keep_checkpoints=100000", f"train.storage_path={out / 'runs'}", f"train.run_name={RUN_NAME}",
            "metrics.metrics=[]",
        ]
        cmd = [sys.executable, "-m", "digan.train", "--config", args.config, *overrides]
        print("training:", " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        total += time.time() - t0
    return total


def checkpoints(run_dir: Path) -> list[tuple[float, Path]]:
    """(kimg, generator file) of every published checkpoint, in training order."""
    from digan.models import read_generator_export

    found = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if (d / "generator.pt").is_file():
            _, meta, _ = read_generator_export(d)
            found.append((float(meta["kimg"]), d / "generator.pt"))
    return sorted(found)


def real_features(cfg, det, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """I3D features of 2N distinct real clips, split into two sets of N (A: the reference, B: the floor)."""
    from digan.data import build_clip_loader

    loader = build_clip_loader(cfg.data, cfg.model.resolution, 8, 16, seed=seed)
    feats, seen = [], 0
    for clips in loader:
        feats.append(det(clips[: 2 * n - seen]))
        seen += feats[-1].shape[0]
        if seen >= 2 * n:
            break
    if seen < 2 * n:
        raise SystemExit(f"the data has only {seen} clips; --num-videos {n} needs {2 * n}")
    f = np.concatenate(feats)
    return f[:n], f[n:]


def fake_features(G, det, n: int, seed: int, clip_frames: int) -> np.ndarray:
    from digan.metrics import iterate_fake_videos

    return np.concatenate([det(v) for v in iterate_fake_videos(G, n, 16, seed, 8, clip_frames)])


def grid(G, seeds: list[int], frames: int, clip_frames: int) -> np.ndarray:
    """uint8 [len(seeds)*H, frames*W, 3]: each row one video at t = 0 .. 1, frames evenly spaced."""
    from digan.sampling import sample_videos
    from digan.video_io import frame_grid

    vids = sample_videos(G, seeds, clip_frames, clip_frames)  # [V, T, H, W, 3]: the videos generate renders
    pick = np.linspace(0, clip_frames - 1, frames).round().astype(int)
    frames_ = vids[:, pick].reshape(-1, *vids.shape[2:])
    scale = max(1, 64 // frames_.shape[1])  # nearest-neighbour upscale so that 32 px frames can be seen
    frames_ = frames_.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return frame_grid(frames_, num_cols=frames, pad=2)


def plot_curve(rows: list[dict], floor: float, path: Path, title: str) -> None:
    """FVD vs kimg as a PNG, drawn with PIL (no plotting library): points, line, the floor dashed."""
    w, h, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [r["kimg"] for r in rows]
    ys = [r["fvd16"] for r in rows]
    x_max = max(xs) * 1.05
    y_max = max(ys + [floor]) * 1.1

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (w - left - right) * x / x_max, h - bottom - (h - top - bottom) * y / y_max

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        yv = y_max * k / 5
        _, yy = px(0, yv)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((5, yy - 6), f"{yv:.0f}", fill="black")
        xv = x_max * k / 5
        xx, _ = px(xv, 0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 10, h - bottom + 8), f"{xv:.3g}", fill="black")
    _, fy = px(0, floor)
    for x0 in range(left, w - right, 12):
        d.line([x0, fy, min(x0 + 6, w - right), fy], fill=(0, 140, 0), width=2)
    d.text((left + 6, fy - 14), f"real vs real: {floor:.0f}", fill=(0, 110, 0))
    pts = [px(x, y) for x, y in zip(xs, ys)]
    if len(pts) > 1:
        d.line(pts, fill=(30, 60, 200), width=2)
    for x, y in pts:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 60, 200))
    d.text((left, 12), title, fill="black")
    d.text((w // 2 - 20, h - 20), "kimg", fill="black")
    img.save(path)


def score(points: Iterable[tuple[float, torch.nn.Module]], cfg, out: Path, n: int, seed: int, grid_seeds: list[int],
          grid_frames: int, title: str, columns: dict | None = None,
          extra: Callable[[torch.nn.Module], dict] | None = None) -> list[dict]:
    """Score every (kimg, G_ema): real FVD16 against N real clips, the floor, frame grids of `grid_seeds`.

    Writes `grids/`, `progress.png`, `quality.csv` (with `columns`, and `extra(G)`'s per-point columns) and
    `curve.png` into `out`; returns the CSV rows. `points` may be lazy (each G is loaded when scored)."""
    from digan.metrics import build_video_detector, frechet_distance_from_features
    from digan.video_io import write_png

    points = iter(points)
    first = next(points, None)
    if first is None:  # before the real features: they take minutes
        raise SystemExit(f"nothing to score in {out}")
    det = build_video_detector("i3d", "tfhub", "cpu")
    ref, other = real_features(cfg, det, n, seed)
    floor = frechet_distance_from_features(ref, other)
    print(f"floor (real vs real, N={n}): {floor:.1f}", file=sys.stderr, flush=True)
    rows, strips = [], []
    for kimg, G in itertools.chain([first], points):
        fvd = frechet_distance_from_features(fake_features(G, det, n, seed, cfg.data.num_frames), ref)
        more = extra(G) if extra else {}
        img = grid(G, grid_seeds, grid_frames, cfg.data.num_frames)
        write_png(out / "grids" / f"kimg-{kimg:06.1f}.png", img)
        strips.append(img[: img.shape[0] // len(grid_seeds)])
        rows.append({"kimg": kimg, "fvd16": round(fvd, 2), "floor_fvd16": round(floor, 2), "num_videos": n,
                     **more, "seed": seed, "protocol": "tfhub", "detector": "i3d_k400_tfhub", **(columns or {})})
        shown = "".join(f"  {k} {v:.1f}" for k, v in more.items())
        print(f"kimg {kimg:7.1f}  fvd16 {fvd:8.1f}  (floor {floor:.1f}){shown}", file=sys.stderr, flush=True)
    write_png(out / "progress.png", np.concatenate(strips))
    with open(out / "quality.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    plot_curve(rows, floor, out / "curve.png", title)
    return rows


def evaluate(args: argparse.Namespace, cfg, out: Path, train_s: float | None) -> list[dict]:
    from digan.data.demo import ensure_demo_shards
    from digan.models import load_generator

    if cfg.data.source == "demo":
        cfg.data.source = ensure_demo_shards(cfg.data, cfg.model.resolution)
    points = checkpoints(out / "runs" / RUN_NAME)
    if not points:
        raise SystemExit(f"no checkpoints with a generator.pt under {out / 'runs' / RUN_NAME}")
    loaded = ((kimg, load_generator(file)[0].eval()) for kimg, file in points)
    title = f"{args.config} {' '.join(args.overrides)}: real FVD16 (TF-Hub I3D, N={args.num_videos}) vs kimg"
    return score(loaded, cfg, out, args.num_videos, args.seed, [int(s) for s in args.grid_seeds.split(",")],
                 args.grid_frames, title, {"train_wall_s": round(train_s, 1) if train_s else ""})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    out = Path(args.out).resolve()
    if args.dry_run:
        print(json.dumps({"config": args.config, "overrides": args.overrides, "kimg": args.kimg,
                          "points": schedule(args), "num_videos": args.num_videos, "out": str(out)}))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    train_s = None if args.eval_only else train(args, out)
    rows = evaluate(args, cfg, out, train_s)
    first, last = rows[0]["fvd16"], rows[-1]["fvd16"]
    rate = f", {args.kimg / (train_s / 3600):.0f} kimg/hour" if train_s else ""
    print(f"\nFVD16 {first:.1f} at {rows[0]['kimg']:g} kimg -> {last:.1f} at {rows[-1]['kimg']:g} kimg "
          f"({last / first:.2f}x; floor {rows[0]['floor_fvd16']:.1f}){rate}\n  {out / 'quality.csv'}\n"
          f"  {out / 'curve.png'}\n  {out / 'progress.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
