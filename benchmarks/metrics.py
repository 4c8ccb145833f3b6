"""Throughput of the metric feature extractors: I3D clips/s (FVD), Inception frames/s (FID), proxy clips/s.

    python benchmarks/metrics.py                       # CPU, 2 threads
    python benchmarks/metrics.py --device cuda --clips 256 --batch-size 32

Input is what compute_metrics feeds the detectors: uint8 128x128 clips (the DIGAN resolution), so the
figures include the protocol preprocessing (resize to 224, scaling) and the host->device copy.
It prints one line per measurement and a JSON summary; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def _time(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--clips", type=int, default=4, help="clips per timed call")
    p.add_argument("--batch-size", type=int, default=4, help="16-frame clips per network batch")
    p.add_argument("--resolution", type=int, default=128, help="side of the uint8 input clips")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (after one warm-up call)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: i3d,i3d128,fid,proxy")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    skip = set(filter(None, args.skip.split(",")))

    from digan.metrics import build_frame_detector, build_video_detector

    rng = np.random.default_rng(0)
    clips16 = torch.from_numpy(rng.integers(0, 256, (args.clips, 16, args.resolution, args.resolution, 3), np.uint8))
    results: dict[str, float] = {}
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'cpu'}"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.threads} CPU threads, "
          f"{args.clips} clips x 16 frames at {args.resolution}px per call, batch {args.batch_size}")

    if "i3d" not in skip:
        det = build_video_detector("i3d", "tfhub", device, batch_size=args.batch_size)
        s = _time(lambda: det(clips16), 1, args.reps)
        results["i3d_fvd16_clips_per_s"] = args.clips / s
        print(f"I3D (FVD16, tfhub protocol): {args.clips / s:8.2f} clips/s  ({s / args.clips * 1e3:.0f} ms/clip)")
    if "i3d128" not in skip and device.startswith("cuda"):
        clips128 = clips16.repeat(1, 8, 1, 1, 1)[: max(1, args.clips // 4)]
        det = build_video_detector("i3d", "tfhub", device, batch_size=args.batch_size)
        s = _time(lambda: det(clips128), 1, args.reps)
        results["i3d_fvd128_clips_per_s"] = len(clips128) / s
        print(f"I3D (FVD128):                {len(clips128) / s:8.2f} clips/s")
    if "fid" not in skip:
        frames = clips16[: max(1, args.clips // 4)].reshape(-1, args.resolution, args.resolution, 3)
        det = build_frame_detector("i3d", device, batch_size=args.batch_size * 16)
        s = _time(lambda: det(frames), 1, args.reps)
        results["inception_fid_frames_per_s"] = len(frames) / s
        print(f"Inception (FID, 299 px):     {len(frames) / s:8.2f} frames/s")
    if "proxy" not in skip:
        small = clips16[..., ::2, ::2, :].contiguous() if args.resolution >= 64 else clips16
        det = build_video_detector("proxy", "tfhub", device, batch_size=args.batch_size)
        s = _time(lambda: det(small), 1, args.reps)
        results["proxy_clips_per_s"] = args.clips / s
        print(f"proxy 3D CNN (64 px):        {args.clips / s:8.2f} clips/s")
    print(json.dumps({"device": device, "device_name": name, "threads": args.threads, **results}))


if __name__ == "__main__":
    main()
