"""Time one DIGAN training iteration, split into its phases, and compare with the official code.

    python benchmarks/train_step.py                              # all rows, CUDA if available, else CPU
    python benchmarks/train_step.py --rows official --official-repo /tmp/digan-official --repeat 2

Rows (each runs in its own subprocess, so peak memory is per row):
  demo-64            the demo-64 preset
  digan-128          the paper's model (digan/configs/digan-128.yaml)
  official           "official settings" of the CPU comparison: digan-128 widths at 64x64 (input grid 32, so
                     blocks 4..32 on the 32x32 trunk and one upsampling block at 64; no extra conv, which the
                     official config only has at 128), batch 4. The speed-up target is >= 1.5x over the
                     official code at these settings.
  official-code      the official code itself, as its repository ships it (benchmarks/official_code.py on a
                     checkout of github.com/sihyun-yu/digan at e822320, given with --official-repo; it adds this
                     row ahead of `official`, so that --repeat interleaves the two). Whole official iterations:
                     Gmain, Greg, Dmain, and Dreg every 16th. The target is judged against this row.
  official-baseline  a stand-in for when no checkout is at hand: our model and weights, computed the way the
                     official code computes it (benchmarks/official_baseline.py; its ops and phases, but our
                     generator). Judged against only when there is no official-code row.

Phases: D step (plain), D step of an R1 iteration, G step (D frozen), EMA update. A plain iteration is
D + G + EMA, an R1 iteration is D_R1 + G + EMA. Our D_R1 follows the recipe's `loss.r1_schedule`: "separate"
(the default, as the official code: the D step, then R1 in its own D step) or "folded" (R1 added to the D
step; --r1-schedule folded). Official code: D = Dmain, D_R1 = Dmain + Dreg, G = Gmain + Greg, and its plain and
R1 iteration times are whole iterations. (Baseline: D = official Dmain, D_R1 = Dmain + its separate Dreg phase,
G = Gmain + Greg.) Medians over all timed iterations; --repeat alternates the rows so that they share the
machine's load, and the ratios of each round's adjacent rows are printed too. Peak memory is ru_maxrss of the
row's process on CPU, torch.cuda.max_memory_allocated on GPU; "faults" are the process's minor page faults and
"sys" its kernel CPU seconds per timed iteration (both CPU only). Real data is random (timing does not depend
on pixel values). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from common import json_row, load_avg, peak_rss_mib  # noqa: E402 (also puts the repository on sys.path)
from digan.config import load_config  # noqa: E402
from digan.malloc import configure_malloc  # noqa: E402
from digan.models import cpu_kernels  # noqa: E402
from digan.training import SingleProcessTrainer, d_step, g_step, r1_step  # noqa: E402

TARGET_SPEEDUP = 1.5
OFFICIAL_CODE = Path(__file__).resolve().parent / "official_code.py"
PHASES = ("D", "D_R1", "G", "EMA")

ROWS = {
    # name: (preset, overrides, CPU batch)
    "demo-32": ("demo-32", [], 16),  # a quick smoke row
    "demo-32-baseline": ("demo-32", [], 16),
    "demo-64": ("demo-64", [], 16),
    "digan-128": ("digan-128", [], 4),
    "official": ("digan-128", ["model.resolution=64", "model.extra_conv_resolutions=[]"], 4),
    "official-baseline": ("digan-128", ["model.resolution=64", "model.extra_conv_resolutions=[]"], 4),
    "official-code": (None, [], 4),  # benchmarks/official_code.py on --official-repo
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

    def d_r1_ours() -> None:  # as digan.training.train_step runs an R1 iteration's D side
        d_step(G, D.img, D.mot, trainer.d_updater, loss, real_pair, real_dt, not loss.separate_r1)
        if loss.separate_r1:
            r1_step(D.img, D.mot, trainer.d_updater, loss, real_pair, real_dt)

    return {
        "D": lambda: d_step(G, D.img, D.mot, trainer.d_updater, loss, real_pair, real_dt, False),
        "D_R1": d_r1_ours,
        "G": lambda: g_step(G, D.img, D.mot, trainer.g_updater, loss, batch),
    }


def run_row(name: str, batch: int | None, iters: int, warmup: int, device: torch.device,
            default_malloc: bool = False, r1_schedule: str | None = None) -> dict:
    preset, overrides, cpu_batch = ROWS[name]
    if batch is None:  # the preset's batch on GPU; small enough to finish on a CPU
        batch = cpu_batch if device.type == "cpu" else load_config(preset).train.batch_size
    if r1_schedule is not None:
        overrides = overrides + [f"loss.r1_schedule={r1_schedule}"]
    cfg = load_config(preset, overrides + [f"train.batch_size={batch}", "dist.num_workers=1"])
    cpu_kernels.enable(device.type == "cpu")  # as the workers run on CPU
    # Our rows run as our workers do (digan/malloc.py on CPU); the baselines as the official code, with
    # glibc's default malloc.
    kept = not name.endswith("-baseline") and not default_malloc and configure_malloc(cfg.dist, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official code
    trainer = SingleProcessTrainer(cfg, device, seed=0)
    res = cfg.model.resolution
    real_pair = torch.rand(batch, 2, 3, res, res, device=device) * 2 - 1
    real_dt = torch.rand(batch, device=device)
    fns = _phase_fns(name, trainer, real_pair, real_dt)

    wall: dict[str, list[float]] = {k: [] for k in PHASES}
    cpu: dict[str, list[float]] = {k: [] for k in PHASES}
    faults: dict[str, list[float]] = {k: [] for k in PHASES}
    sys_s: dict[str, list[float]] = {k: [] for k in PHASES}
    for i in range(warmup + iters):
        fns["EMA"] = lambda: trainer.ema.update(trainer.G, 10_000 * (i + 1))
        line = []
        for key in PHASES:
            # Process CPU seconds (all threads) next to wall seconds: contention inflates them much less.
            _sync(device)
            before = resource.getrusage(resource.RUSAGE_SELF)
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[key]()
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            after = resource.getrusage(resource.RUSAGE_SELF)
            line.append(f"{key} {seconds:.2f}s")
            if i >= warmup:
                wall[key].append(seconds)
                cpu[key].append(cpu_seconds)
                faults[key].append(after.ru_minflt - before.ru_minflt)
                sys_s[key].append(after.ru_stime - before.ru_stime)
        print(f"  {name} {'warmup' if i < warmup else 'iter'} {i}: {' '.join(line)}  "
              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = peak_rss_mib()
    return {
        "row": name, "resolution": res, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
        "G_params_M": sum(p.numel() for p in trainer.G.parameters()) / 1e6,
        "D_params_M": sum(p.numel() for p in trainer.D.parameters()) / 1e6,
        "wall": wall, "cpu": cpu, "faults": faults, "sys": sys_s, "peak_mem_MiB": peak_mib,
        "malloc": "keep freed" if kept else "glibc default",
        "r1_schedule": "separate" if name.endswith("-baseline") else trainer.loss.r1_schedule,
    }


def _iteration_figures(runs: list[dict], measure: str) -> tuple[float, float]:
    """(plain, R1) per-iteration medians of one measure over the given runs of a row."""
    if "iterations" in runs[0]:  # the official code: whole iterations were timed
        return tuple(statistics.median(it[measure] for run in runs for it in run["iterations"][kind])
                     for kind in ("plain", "r1"))
    med = {k: statistics.median(x for run in runs for x in run[measure][k]) for k in PHASES}
    return med["D"] + med["G"] + med["EMA"], med["D_R1"] + med["G"] + med["EMA"]


def summarize(runs: list[dict]) -> dict:
    """Merge the repeats of one row: medians over every timed iteration, and each round's own figures."""
    r = dict(runs[0])
    r["wall_med"] = {k: statistics.median(x for run in runs for x in run["wall"][k]) for k in PHASES}
    for measure in ("wall", "cpu", "sys", "faults"):
        if measure in r:
            r[f"{measure}_plain"], r[f"{measure}_r1"] = _iteration_figures(runs, measure)
    r["rounds"] = [_iteration_figures([run], "wall") for run in runs]
    r["num_iters"] = sum(len(run["wall"]["D"]) for run in runs)
    r["peak_mem_MiB"] = max(run["peak_mem_MiB"] for run in runs)
    return r


def print_table(results: dict[str, dict]) -> None:
    print(f"{'row':<18} {'res':>4} {'batch':>5} {'D':>8} {'D+R1':>8} {'G':>8} {'EMA':>6} {'plain it':>9} "
          f"{'R1 it':>9} {'cpu plain':>10} {'cpu R1':>8} {'sys plain':>10} {'Mflt plain':>11} {'peak MiB':>9} "
          f"{'n':>3}  malloc, R1")
    nan = float("nan")
    for r in results.values():
        w = r["wall_med"]
        print(f"{r['row']:<18} {r['resolution']:>4} {r['batch']:>5} {w['D']:>8.2f} {w['D_R1']:>8.2f} {w['G']:>8.2f} "
              f"{w['EMA']:>6.2f} {r['wall_plain']:>9.2f} {r['wall_r1']:>9.2f} {r['cpu_plain']:>10.2f} "
              f"{r['cpu_r1']:>8.2f} {r.get('sys_plain', nan):>10.2f} {r.get('faults_plain', nan) / 1e6:>11.2f} "
              f"{r['peak_mem_MiB']:>9.0f} {r['num_iters']:>3}  {r['malloc']}, {r.get('r1_schedule', 'separate')}")
    print("seconds, medians; cpu = process CPU seconds over all threads (wall times on a contended machine "
          "are inflated), sys = the kernel's share of them, Mflt = millions of minor page faults")
    ours = results.get("official")
    judge = results.get("official-code") or results.get("official-baseline")
    if not (ours and judge):
        return
    what = ("the official code (" + judge.get("official_commit", "?") + ")" if judge["row"] == "official-code"
            else "the official-structure stand-in (official_baseline.py; no --official-repo given)")
    for a, b in zip(judge["rounds"], ours["rounds"]):
        print(f"round: {judge['row']} {a[0]:.2f} / {a[1]:.2f} s, official {b[0]:.2f} / {b[1]:.2f} s per plain / R1 "
              f"iteration: {a[0] / b[0]:.2f}x / {a[1] / b[1]:.2f}x")
    for kind in ("wall", "cpu"):
        print(f"official settings vs {what}, same machine and time ({kind}, medians): "
              f"{judge[f'{kind}_plain'] / ours[f'{kind}_plain']:.2f}x per plain iteration, "
              f"{judge[f'{kind}_r1'] / ours[f'{kind}_r1']:.2f}x per R1 iteration")
    if ours["device"] == "cpu":
        print(f"peak RSS: official {ours['peak_mem_MiB'] / 1024:.2f} GiB, {judge['row']} "
              f"{judge['peak_mem_MiB'] / 1024:.2f} GiB ({ours['peak_mem_MiB'] / judge['peak_mem_MiB']:.2f}x)")
    speedup = min(judge["wall_plain"] / ours["wall_plain"], judge["wall_r1"] / ours["wall_r1"])
    verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
    print(f"{verdict} the {TARGET_SPEEDUP}x target over {what} (same run, wall time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="demo-64,digan-128,official,official-baseline",
                        help="comma-separated: " + ",".join(ROWS))
    parser.add_argument("--official-repo", type=Path, default=None,
                        help="a checkout of github.com/sihyun-yu/digan (e822320): adds the official-code row")
    parser.add_argument("--iters", type=int, default=2,
                        help="timed iterations per row and repeat (official-code: this many plain and R1 each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--repeat", type=int, default=1, help="run the row list this many times, alternating")
    parser.add_argument("--batch", type=int, default=None,
                        help="pairs per step (default: 4, 16 for demo-64 on CPU; the preset's batch on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default malloc for every row (ablation of digan/malloc.py)")
    parser.add_argument("--r1-schedule", choices=("separate", "folded"), default=None,
                        help="our rows' loss.r1_schedule (default: the config's, separate)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_row(args.one, args.batch, args.iters, args.warmup, device, args.default_malloc,
                                 args.r1_schedule)))
        return

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r} (choose from {', '.join(ROWS)})")
    if args.official_repo is not None and "official-code" not in rows:
        rows.insert(rows.index("official") if "official" in rows else 0, "official-code")
    if "official-code" in rows and (args.official_repo is None or device.type != "cpu"):
        parser.error("the official-code row needs --official-repo and runs on the CPU")
    print(f"device {device}, torch {torch.__version__}, threads {args.threads}, "
          f"load average {load_avg()}", flush=True)
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for _ in range(args.repeat):
        for row in rows:
            common = ["--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            if args.batch is not None:
                common += ["--batch", str(args.batch)]
            if row == "official-code":
                cmd = [sys.executable, str(OFFICIAL_CODE), "--official-repo", str(args.official_repo), "--json"]
            else:
                cmd = [sys.executable, __file__, "--one", row, "--device", str(device)]
                if args.default_malloc:
                    cmd.append("--default-malloc")
                if args.r1_schedule:
                    cmd += ["--r1-schedule", args.r1_schedule]
            runs[row].append(json_row(cmd + common, show_progress=True))
            print(f"  {row} done (load average {load_avg()})", file=sys.stderr, flush=True)
    print(f"load average after: {load_avg()}")
    print_table({row: summarize(r) for row, r in runs.items()})


if __name__ == "__main__":
    main()
