"""Weak scaling of the main job: samples/s with 1 and 2 Ray Train workers at the same per-worker batch.

    python benchmarks/scaling.py                          # demo-32, 8 pairs per worker, CPU or GPU (auto)
    python benchmarks/scaling.py --preset digan-128 --batch-per-worker 8 --steps 40
    python benchmarks/scaling.py --workers 1 2 4 --zero-stage 2

Each row is a real run of `digan.train.launch` (Ray Train + DeepSpeed engines + the streaming demo loader),
on a fresh local Ray cluster (or RAY_ADDRESS), with checkpoints, samples and metrics pushed past the end.
Throughput is read from the run's stats.jsonl: samples/s per logging window, the median of the windows
after the first (start-up, first DeepSpeed step and loader warm-up excluded). Efficiency from 1 to N
workers = samples/s(N) / (N x samples/s(1)); the target is >= 85 % from 1 to 2.

On a shared CPU machine the figures move with the load of other processes: the script prints the load
average before and after each row, and each worker gets `--threads` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from digan.config import load_config  # noqa: E402

TARGET = 0.85


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_row(args: argparse.Namespace, num_workers: int, storage: str) -> dict:
    from digan.train import launch

    log_every = args.log_every
    overrides = [
        f"dist.num_workers={num_workers}", f"dist.cpus_per_worker={args.threads}",
        f"dist.zero_stage={args.zero_stage}", f"dist.precision={args.precision}",
        f"train.batch_size={args.batch_per_worker * num_workers}",
        f"train.total_kimg={args.steps * args.batch_per_worker * num_workers / 1000}",
        f"train.log_every_steps={log_every}", "train.checkpoint_kimg=1000000", "train.sample_kimg=1000000",
        "metrics.metrics=[]", f"train.storage_path={storage}", f"train.run_name=scaling-w{num_workers}",
        f"data.num_workers={args.data_workers}", "dist.max_failures=0",
    ]
    cfg = load_config(args.preset, overrides + args.overrides)
    before = load_avg()
    t0 = time.time()
    launch(cfg, handle_signals=False)
    wall = time.time() - t0
    stats = [json.loads(line) for line in (Path(storage) / cfg.train.run_name / "stats.jsonl").read_text().splitlines()]
    windows = [s for s in stats if s["step"] % log_every == 0][1:]  # drop the first window (warm-up)
    if not windows:
        raise SystemExit(f"--steps {args.steps} leaves no measured window after warm-up (log every {log_every})")
    return {"workers": num_workers, "samples_per_s": statistics.median(s["samples_per_s"] for s in windows),
            "it_per_s": statistics.median(s["it_per_s"] for s in windows),
            "data_wait_frac": statistics.median(s["data_wait_frac"] for s in windows),
            # samples per CPU-second of the training processes (cpu_util is the per-rank mean)
            "samples_per_cpu_s": statistics.median(s["samples_per_s"] / (s["cpu_util"] * num_workers)
                                                   for s in windows),
            "cpu_util": statistics.median(s["cpu_util"] for s in windows),
            "windows": len(windows), "wall_s": wall, "load_before": before, "load_after": load_avg()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo-32")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-per-worker", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="training steps per row")
    p.add_argument("--log-every", type=int, default=5, help="steps per measured window")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per worker")
    p.add_argument("--data-workers", type=int, default=1, help="DataLoader processes per worker")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="more config overrides")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"weak scaling, {args.preset}, {args.batch_per_worker} pairs per worker, ZeRO-{args.zero_stage} "
          f"{args.precision}, {args.steps} steps per row, device: {device}", flush=True)
    from digan.train import init_ray

    # One cluster for all rows (RAY_ADDRESS, else a local one with a CPU slot for every worker of the largest row).
    init_ray(load_config(args.preset, [f"dist.num_workers={max(args.workers)}", f"dist.cpus_per_worker={args.threads}",
                                       f"train.batch_size={max(args.workers)}"]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="digan-scaling-") as storage:
        for n in args.workers:
            rows.append(run_row(args, n, storage))
            r = rows[-1]
            print(f"  {n} worker(s): {r['samples_per_s']:8.2f} samples/s  ({r['it_per_s']:.3f} it/s, data wait "
                  f"{100 * r['data_wait_frac']:.1f} %, {r['windows']} windows, {r['wall_s']:.0f} s wall, load "
                  f"{r['load_before']} -> {r['load_after']})", flush=True)
    base = rows[0]
    print("\nworkers  samples/s  efficiency  | CPU/worker  samples/CPU-s  CPU-normalised efficiency")
    for r in rows:
        eff = r["samples_per_s"] / (r["workers"] / base["workers"] * base["samples_per_s"])
        eff_cpu = r["samples_per_cpu_s"] / base["samples_per_cpu_s"]
        r["efficiency"], r["efficiency_cpu_normalised"] = eff, eff_cpu
        mark = "" if r is base else ("  (target >= 85 %: met)" if eff >= TARGET else "  (target >= 85 %: NOT met)")
        print(f"{r['workers']:7d}  {r['samples_per_s']:9.2f}  {100 * eff:9.1f} %  | {r['cpu_util']:10.2f}  "
              f"{r['samples_per_cpu_s']:13.2f}  {100 * eff_cpu:6.1f} %{mark}")
    print("(efficiency = samples/s(N) / (N x samples/s(1)), the target figure. The CPU-normalised one divides by\n"
          " the CPU time the workers actually got: on a machine shared with other jobs it estimates the parallel\n"
          " overhead (communication, duplicated work) that an idle machine would show; it does not see waits.)")
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
