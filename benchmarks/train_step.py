"""Time one DIGAN training iteration, split into its phases, and compare with the official code.

    python benchmarks/train_step.py                              # all rows, CUDA if available, else CPU
    python benchmarks/train_step.py --rows official,official-baseline --repeat 2 --threads 1

Rows (each runs in its own subprocess, so peak memory is per row):
  demo-64            the demo-64 preset
  digan-128          the paper's model (digan/configs/digan-128.yaml)
  official           "official settings" of the CPU comparison: digan-128 widths at 64x64 (input grid 32, so
                     blocks 4..32 on the 32x32 trunk and one upsampling block at 64; no extra conv, which the
                     official config only has at 128), batch 4. The speed-up target is >= 1.5x over the
                     official code at these settings.
  official-baseline  the same model and batch, computed the way the official code computes it
                     (benchmarks/official_baseline.py), for a same-machine, same-time comparison. The
                     target is judged against this row.

Why against a same-run baseline: the issue quotes the official code at ~26 s per plain and ~52 s per R1
iteration on this VM, but the VM's speed moves with its host. On 2026-11-26 the official code itself
(sihyun-yu/digan @ 8eeba58 with stylegan2-ada-pytorch's torch_utils, built from the public sources
outside this repository: its networks, OurStyleGAN2Loss and phase loop, fp32 on CPU, parameter counts
exact) took 39.9 s / 71.9 s and 42.6 s / 75.4 s in two runs, interleaved with these rows, while
`official-baseline` took 35.8 s / 66.7 s: the baseline is a conservative stand-in (it renders with our
faster generator), so the ratio against it understates the speed-up over the official code. The fixed
26 s / 52 s figures are still printed for reference.

Phases: D step (plain), D step with lazy R1, G step (D frozen), EMA update. A plain iteration is D + G + EMA,
an R1 iteration is D_R1 + G + EMA. (Baseline: D = official Dmain, D_R1 = Dmain + its separate Dreg phase,
G = Gmain + Greg.) Medians over all timed iterations; --repeat alternates the rows so that they share the
machine's load. Peak memory is ru_maxrss of the row's process on CPU, torch.cuda.max_memory_allocated on
GPU. Real data is random (timing does not depend on pixel values). Progress goes to stderr.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digan.config import load_config  # noqa: E402
from digan.malloc import configure_malloc  # noqa: E402
from digan.training import SingleProcessTrainer, d_step, g_step  # noqa: E402

OFFICIAL_PLAIN_S, OFFICIAL_R1_S = 26.0, 52.0  # the figures for the official code on this VM
TARGET_SPEEDUP = 1.5
PHASES = ("D", "D_R1", "G", "EMA")

ROWS = {
    # name: (preset, overrides, CPU batch)
    "demo-32": ("demo-32", [], 16),  # a quick smoke row
    "demo-32-baseline": ("demo-32", [], 16),
    "demo-64": ("demo-64", [], 16),
    "digan-128": ("digan-128", [], 4),
    "official": ("digan-128", ["model.resolution=64", "model.extra_conv_resolutions=[]"], 4),
    "official-baseline": ("digan-128", ["model.resolution=64", "model.extra_conv_resolutions=[]"], 4),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase_fns(name: str, trainer: SingleProcessTrainer, real_pair: torch.Tensor, real_dt: torch.Tensor):
    """The four timed callables of a row: ours (the recipe) or the official-structure baseline."""
    G, D, loss, batch = trainer.G, trainer.D, trainer.loss, real_pair.shape[0]
    g_opt, d_opt = trainer.g_updater.optimizer, trainer.d_updater.optimizer
    if name.endswith("-baseline"):
        from official_baseline import official_d_phase, official_discriminator, official_g_phase, official_r1_phase

        with torch.no_grad():  # the baseline must compute the same function as our discriminators
            x = real_pair[:4].flatten(0, 1)
            ref, got = official_discriminator(D.img, x), D.img(x)
            err = ((ref - got).abs().max() / got.abs().max().clamp_min(1e-6)).item()
        print(f"  {name}: baseline D vs ours, max relative difference {err:.1e}", file=sys.stderr, flush=True)
        if err > 1e-3:
            raise RuntimeError(f"official-structure baseline disagrees with digan.models (rel. error {err:.1e})")

        def d_r1() -> None:
            official_d_phase(G, D, d_opt, loss, real_pair, real_dt)
            official_r1_phase(D, d_opt, loss, real_pair, real_dt)

        return {
            "D": lambda: official_d_phase(G, D, d_opt, loss, real_pair, real_dt),
            "D_R1": d_r1,
            "G": lambda: official_g_phase(G, D, g_opt, loss, batch),
        }
    return {
        "D": lambda: d_step(G, D.img, D.mot, trainer.d_updater, loss, real_pair, real_dt, False),
        "D_R1": lambda: d_step(G, D.img, D.mot, trainer.d_updater, loss, real_pair, real_dt, True),
        "G": lambda: g_step(G, D.img, D.mot, trainer.g_updater, loss, batch),
    }


def run_row(name: str, batch: int | None, iters: int, warmup: int, device: torch.device,
            default_malloc: bool = False) -> dict:
    preset, overrides, cpu_batch = ROWS[name]
    if batch is None:  # the preset's batch on GPU; small enough to finish on a CPU
        batch = cpu_batch if device.type == "cpu" else load_config(preset).train.batch_size
    cfg = load_config(preset, overrides + [f"train.batch_size={batch}", "dist.num_workers=1"])
    # Our rows run as our workers do (digan/malloc.py on CPU); the baselines as the official code, with
    # glibc's default malloc.
    kept = not name.endswith("-baseline") and not default_malloc and configure_malloc(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official code
    trainer = SingleProcessTrainer(cfg, device, seed=0)
    res = cfg.model.resolution
    real_pair = torch.rand(batch, 2, 3, res, res, device=device) * 2 - 1
    real_dt = torch.rand(batch, device=device)
    fns = _phase_fns(name, trainer, real_pair, real_dt)

    wall: dict[str, list[float]] = {k: [] for k in PHASES}
    cpu: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(warmup + iters):
        fns["EMA"] = lambda: trainer.ema.update(trainer.G, 10_000 * (i + 1))
        line = []
        for key in PHASES:
            # Process CPU seconds (all threads) next to wall seconds: contention inflates them much less.
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[key]()
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            line.append(f"{key} {seconds:.2f}s")
            if i >= warmup:
                wall[key].append(seconds)
                cpu[key].append(cpu_seconds)
        print(f"  {name} {'warmup' if i < warmup else 'iter'} {i}: {' '.join(line)}  "
              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "row": name, "resolution": res, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
        "G_params_M": sum(p.numel() for p in trainer.G.parameters()) / 1e6,
        "D_params_M": sum(p.numel() for p in trainer.D.parameters()) / 1e6,
        "wall": wall, "cpu": cpu, "peak_mem_MiB": peak_mib, "malloc": "keep freed" if kept else "glibc default",
    }


def summarize(runs: list[dict]) -> dict:
    """Merge the repeats of one row: medians over every timed iteration."""
    r = dict(runs[0])
    for kind in ("wall", "cpu"):
        med = {k: statistics.median(x for run in runs for x in run[kind][k]) for k in PHASES}
        r[f"{kind}_med"] = med
        r[f"{kind}_plain"] = med["D"] + med["G"] + med["EMA"]
        r[f"{kind}_r1"] = med["D_R1"] + med["G"] + med["EMA"]
    r["num_iters"] = sum(len(run["wall"]["D"]) for run in runs)
    r["peak_mem_MiB"] = max(run["peak_mem_MiB"] for run in runs)
    return r


def print_table(results: dict[str, dict]) -> None:
    print(f"{'row':<18} {'res':>4} {'batch':>5} {'D':>8} {'D+R1':>8} {'G':>8} {'EMA':>6} {'plain it':>9} "
          f"{'R1 it':>9} {'cpu plain':>10} {'cpu R1':>8} {'peak MiB':>9} {'n':>3}  malloc")
    for r in results.values():
        w = r["wall_med"]
        print(f"{r['row']:<18} {r['resolution']:>4} {r['batch']:>5} {w['D']:>8.2f} {w['D_R1']:>8.2f} {w['G']:>8.2f} "
              f"{w['EMA']:>6.2f} {r['wall_plain']:>9.2f} {r['wall_r1']:>9.2f} {r['cpu_plain']:>10.2f} "
              f"{r['cpu_r1']:>8.2f} {r['peak_mem_MiB']:>9.0f} {r['num_iters']:>3}  {r['malloc']}")
    print("seconds, medians; cpu = process CPU seconds over all threads (wall times on a contended machine "
          "are inflated)")
    ours, base = results.get("official"), results.get("official-baseline")
    if ours and ours["device"] == "cpu":
        plain, r1 = OFFICIAL_PLAIN_S / ours["wall_plain"], OFFICIAL_R1_S / ours["wall_r1"]
        print(f"official settings vs the issue's fixed figures for the official code ({OFFICIAL_PLAIN_S:.0f} s / "
              f"{OFFICIAL_R1_S:.0f} s, taken on this VM at another time): {plain:.2f}x per plain iteration, "
              f"{r1:.2f}x per R1 iteration")
    if ours and base:
        for kind in ("wall", "cpu"):
            print(f"official settings vs the official-structure baseline, same machine and time ({kind}): "
                  f"{base[f'{kind}_plain'] / ours[f'{kind}_plain']:.2f}x per plain iteration, "
                  f"{base[f'{kind}_r1'] / ours[f'{kind}_r1']:.2f}x per R1 iteration")
        speedup = min(base["wall_plain"] / ours["wall_plain"], base["wall_r1"] / ours["wall_r1"])
        verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
        print(f"{verdict} the {TARGET_SPEEDUP}x target over the official computation (same run, wall time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="demo-64,digan-128,official,official-baseline",
                        help="comma-separated: " + ",".join(ROWS))
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per row and repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--repeat", type=int, default=1, help="run the row list this many times, alternating")
    parser.add_argument("--batch", type=int, default=None,
                        help="pairs per step (default: 4, 16 for demo-64 on CPU; the preset's batch on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default malloc for every row (ablation of digan/malloc.py)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_row(args.one, args.batch, args.iters, args.warmup, device, args.default_malloc)))
        return

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r} (choose from {', '.join(ROWS)})")
    print(f"device {device}, torch {torch.__version__}, threads {args.threads}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for _ in range(args.repeat):
        for row in rows:
            cmd = [sys.executable, __file__, "--one", row, "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--device", str(device)]
            if args.batch is not None:
                cmd += ["--batch", str(args.batch)]
            if args.default_malloc:
                cmd.append("--default-malloc")
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            runs[row].append(json.loads(out.strip().splitlines()[-1]))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table({row: summarize(r) for row, r in runs.items()})


if __name__ == "__main__":
    main()
