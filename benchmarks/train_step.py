"""Time one DIGAN training iteration, split into its phases, and compare with the official code.

    python benchmarks/train_step.py                      # all rows, CUDA if available, else CPU
    python benchmarks/train_step.py --rows official --iters 5 --threads 2

Rows (each runs in its own subprocess, so peak memory is per row):
  demo-64    the demo-64 preset
  digan-128  the paper's model (configs/digan-128.yaml)
  official   "official settings" of the CPU comparison: digan-128 widths at 64x64 (input grid 32, so blocks
             4..32 on the 32x32 trunk and one upsampling block at 64; no extra conv, which the official
             config only has at 128), batch 4. The official code takes ~26 s per plain iteration and ~52 s per
             R1 iteration there on this 2-core CPU (figures given by the project lead), the speed-up
             target is >= 1.5x.

Phases: D step (plain), D step with lazy R1 folded in, G step (D frozen), EMA update. A plain iteration is
D + G + EMA, an R1 iteration is D_R1 + G + EMA. Medians over --iters after --warmup iterations. Peak memory
is ru_maxrss of the row's process on CPU and torch.cuda.max_memory_allocated on GPU. Real data is random
(timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from digan.config import load_config  # noqa: E402
from digan.training import SingleProcessTrainer, d_step, g_step  # noqa: E402

OFFICIAL_PLAIN_S, OFFICIAL_R1_S = 26.0, 52.0  # official code, 64x64, batch 4, this 2-core CPU
TARGET_SPEEDUP = 1.5

ROWS = {
    # name: (preset, overrides, CPU batch)
    "demo-64": ("demo-64", [], 16),
    "digan-128": ("digan-128", [], 4),
    "official": ("digan-128", ["model.resolution=64", "model.extra_conv_resolutions=[]"], 4),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(name: str, batch: int | None, iters: int, warmup: int, device: torch.device) -> dict:
    preset, overrides, cpu_batch = ROWS[name]
    if batch is None:  # the preset's batch on GPU; small enough to finish on a CPU
        batch = cpu_batch if device.type == "cpu" else load_config(preset).train.batch_size
    cfg = load_config(preset, overrides + [f"train.batch_size={batch}", "dist.num_workers=1"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official code
    trainer = SingleProcessTrainer(cfg, device, seed=0)
    G, D_img, D_mot, loss = trainer.G, trainer.D.img, trainer.D.mot, trainer.loss
    res = cfg.model.resolution
    real_pair = torch.rand(batch, 2, 3, res, res, device=device) * 2 - 1
    real_dt = torch.rand(batch, device=device)

    cpu_times: dict[str, list[float]] = {"D": [], "D_R1": [], "G": [], "EMA": []}

    def timed(key: str, fn) -> float:
        """Wall seconds of fn; also records the process CPU seconds (all threads), which a contended
        machine inflates much less than wall time."""
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        cpu_times[key].append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"D": [], "D_R1": [], "G": [], "EMA": []}
    for i in range(warmup + iters):
        t = {
            "D": timed("D", lambda: d_step(G, D_img, D_mot, trainer.d_updater, loss, real_pair, real_dt, False)),
            "D_R1": timed("D_R1", lambda: d_step(G, D_img, D_mot, trainer.d_updater, loss, real_pair, real_dt, True)),
            "G": timed("G", lambda: g_step(G, D_img, D_mot, trainer.g_updater, loss, batch)),
            "EMA": timed("EMA", lambda: trainer.ema.update(G, 10_000 * (i + 1))),
        }
        if i >= warmup:
            for k, v in t.items():
                times[k].append(v)
        else:
            for v in cpu_times.values():
                v.pop()
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "row": name, "resolution": res, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
        "G_params_M": sum(p.numel() for p in G.parameters()) / 1e6,
        "D_params_M": sum(p.numel() for p in trainer.D.parameters()) / 1e6,
        **{f"{k}_s": v for k, v in med.items()},
        "plain_iter_s": med["D"] + med["G"] + med["EMA"],
        "r1_iter_s": med["D_R1"] + med["G"] + med["EMA"],
        "plain_iter_cpu_s": cpu["D"] + cpu["G"] + cpu["EMA"],
        "r1_iter_cpu_s": cpu["D_R1"] + cpu["G"] + cpu["EMA"],
        "spread": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "peak_mem_MiB": peak_mib,
    }


def print_table(results: list[dict]) -> None:
    print(f"{'row':<10} {'res':>4} {'batch':>5} {'D':>8} {'D+R1':>8} {'G':>8} {'EMA':>7} "
          f"{'plain it':>9} {'R1 it':>9} {'cpu plain':>10} {'cpu R1':>8} {'peak MiB':>9}  (seconds, medians)")
    for r in results:
        print(f"{r['row']:<10} {r['resolution']:>4} {r['batch']:>5} {r['D_s']:>8.3f} {r['D_R1_s']:>8.3f} "
              f"{r['G_s']:>8.3f} {r['EMA_s']:>7.3f} {r['plain_iter_s']:>9.3f} {r['r1_iter_s']:>9.3f} "
              f"{r['plain_iter_cpu_s']:>10.2f} {r['r1_iter_cpu_s']:>8.2f} {r['peak_mem_MiB']:>9.0f}")
    print("cpu = process CPU seconds over all threads; wall times on a contended machine are inflated")
    for r in results:
        if r["row"] == "official" and r["device"] == "cpu":
            plain, r1 = OFFICIAL_PLAIN_S / r["plain_iter_s"], OFFICIAL_R1_S / r["r1_iter_s"]
            ok = "meets" if min(plain, r1) >= TARGET_SPEEDUP else "MISSES"
            print(f"official settings: speed-up vs official code {plain:.2f}x per plain iteration "
                  f"({OFFICIAL_PLAIN_S:.0f} s -> {r['plain_iter_s']:.2f} s), {r1:.2f}x per R1 iteration "
                  f"({OFFICIAL_R1_S:.0f} s -> {r['r1_iter_s']:.2f} s); {ok} the {TARGET_SPEEDUP}x target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="demo-64,digan-128,official", help="comma-separated: " + ",".join(ROWS))
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: 4, 16 for demo-64 on CPU; "
                                                                 "the preset's batch on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_row(args.one, args.batch, args.iters, args.warmup, device)))
        return

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r} (choose from {', '.join(ROWS)})")
    print(f"device {device}, torch {torch.__version__}, threads {args.threads}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = []
    for row in rows:
        cmd = [sys.executable, __file__, "--one", row, "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--device", str(device)]
        if args.batch is not None:
            cmd += ["--batch", str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"  {row}: {json.dumps(result['spread'])}", flush=True)
        results.append(result)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(results)


if __name__ == "__main__":
    main()
