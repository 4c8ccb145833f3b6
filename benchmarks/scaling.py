"""Weak scaling of the main job: samples/s with 1 and 2 Ray Train workers at the same per-worker batch.

    python benchmarks/scaling.py                          # demo-64, 8 pairs per worker, CPU or GPU (auto)
    python benchmarks/scaling.py --preset demo-32         # the smallest model: the worst case
    python benchmarks/scaling.py --preset digan-128 --batch-per-worker 8 --steps 40
    python benchmarks/scaling.py --workers 1 2 4 --zero-stage 2
    python benchmarks/scaling.py --preset demo-32 --elastic   # + the largest count as an elastic group

Each row is a real run of `digan.train.launch` (Ray Train + DeepSpeed engines + the streaming demo loader),
on a fresh local Ray cluster (or RAY_ADDRESS), with checkpoints, samples and metrics pushed past the end.
Throughput is read from the run's stats.jsonl: samples/s per logging window, the median of the windows
after the first (start-up, first DeepSpeed step and loader warm-up excluded). Efficiency from 1 to N
workers = samples/s(N) / (N x samples/s(1)); the target is >= 85 % from 1 to 2.

On a shared CPU machine the figures move with the load of other processes: the script prints the load
average before and after each row, and each worker gets `--threads` intra-op threads.

The default preset is demo-64 (one step of 8 pairs takes ~3 s on one core). demo-32's step takes ~0.55 s,
and at that size the costs every step pays whatever the model (gradient all-reduce round trips,
DeepSpeed's step, Python) weigh ~6 % per CPU-second, so it shows the worst case: measured on the 2-core
VM on 2026-11-26, demo-64 86.5-88.6 %, demo-32 74-77 %. On 2 cores, Ray's own processes take ~0.2 of a
core in both, which a 1-worker run gets from the idle second core.

The machine's own ceiling (CPU): N cores are rarely N times one core (shared caches and memory bandwidth,
turbo clocks that drop as more cores work, a VM's vCPUs). `--ceiling-steps` measures it with no
distributed code at all: the same per-worker training step (plain PyTorch, digan.training) in one
process alone, then in N independent processes at once, alternated `--ceiling-rounds` times. N copies
that never talk reach ceiling x N x one copy; the workers' efficiency is then also reported relative
to that ceiling, which is what the distributed code itself costs.

`--elastic` (`elastic_cost.py`) runs the largest count once more as an elastic group (`dist.min_workers` =
count - 1, the same workers placed) and measures what the elastic machinery costs per step where it runs:
- in the step, what makes a step's maths the same at any worker count (latents and augmentation parameters
  drawn for the whole global batch, this rank's rows kept, rows put in the global minibatch-stddev group
  order): `--machinery-steps` steps of one rank in a process of its own, the time inside those functions
  against the step's (an upper bound), and steps with all-local draws alternated with them as a check;
- outside it, what only an elastic group runs (Ray Train's resize checks in its controller, its run-state
  tracking, the driver's bounded wait for `dist.min_workers`): the CPU the driver and Ray Train's actors
  use in the elastic rows beyond the fixed ones, as a share of the workers' CPU.
The sum is the figure against the 2 % target. The rows' samples/s are compared too (`--repeats K`
alternates K more fixed and K elastic rows, compared by medians with the fixed rows' own spread): on a
shared 2-core machine two rows of the same config differ by more than 2 %, so that comparison can only
say the machinery's cost is below the noise.
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

from common import load_avg  # noqa: E402 (also puts the repository on sys.path)
from elastic_cost import elastic_cost, elastic_row  # noqa: E402
from digan.config import load_config  # noqa: E402

TARGET = 0.85


class CpuSampler:
    """Where the machine's CPU goes during a row (Linux /proc): training workers, their DataLoader
    processes, and everything else (Ray's control plane and actors, other users). Polls every 0.5 s;
    `shares(stats_file)` averages over the measured windows (from the first logged window to the last)."""

    def __init__(self, stats_file: Path):
        import threading

        self.stats_file, self.samples, self.stop = stats_file, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _stat(stat_path: str) -> tuple[str, int]:
        """(parent pid, utime + stime ticks) of a /proc/PID/stat or /proc/PID/task/TID/stat file."""
        st = open(stat_path).read()
        f = st[st.rfind(")") + 2:].split()  # the fields after the command name, which may hold spaces
        return f[1], int(f[11]) + int(f[12])

    def _snapshot(self) -> tuple[int, int, int, int, dict[str, int]]:
        """(machine busy ticks, training-worker ticks, their DataLoader children's ticks, the driver's ticks (this
        process but the sampler's own thread), ticks of Ray's other actors by name)."""
        fields = open("/proc/stat").readline().split()[1:]
        busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
        procs, actors = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                if not cmd.startswith(b"ray::"):
                    continue
                ppid, ticks = self._stat(f"/proc/{pid}/stat")
            except OSError:
                continue
            if cmd.startswith(b"ray::RayTrainWorker"):
                procs[pid] = (ppid, ticks)
            else:
                name = cmd.split(b"\0")[0].split()[0].decode(errors="replace")
                actors[name] = actors.get(name, 0) + ticks
        workers = sum(t for ppid, t in procs.values() if ppid not in procs)
        driver = 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != self.tid:
                try:
                    driver += self._stat(f"/proc/self/task/{tid}/stat")[1]
                except OSError:
                    pass
        return busy, workers, sum(t for ppid, t in procs.values() if ppid in procs), driver, actors

    def _lines(self) -> int:
        try:
            return len(self.stats_file.read_text().splitlines())
        except OSError:
            return 0

    def _run(self) -> None:
        import threading

        self.tid = threading.get_native_id()
        while not self.stop.wait(0.5):
            self.samples.append((time.time(), self._lines(), *self._snapshot()))

    def shares(self) -> dict:
        """Mean cores busy over the measured windows: machine, workers, data loaders, everything else; of the
        latter, the driver (this process) and Ray's other actors by name (Ray Train's controller, ...)."""
        self.stop.set()
        self.thread.join()
        final = self._lines()
        inside = [s for s in self.samples if 2 <= s[1] < final] or self.samples  # after window 1, before the end
        (t0, _, b0, w0, d0, r0, a0), (t1, _, b1, w1, d1, r1, a1) = inside[0], inside[-1]
        hz = os.sysconf("SC_CLK_TCK") * max(t1 - t0, 1e-9)
        busy, workers, loaders = (b1 - b0) / hz, (w1 - w0) / hz, (d1 - d0) / hz
        actors = {k: (v - a0.get(k, 0)) / hz for k, v in a1.items()}
        return {"machine_cores_busy": busy, "worker_cores": workers, "loader_cores": loaders,
                "other_cores": max(0.0, busy - workers - loaders), "driver_cores": (r1 - r0) / hz,
                "actor_cores": {k: round(v, 4) for k, v in sorted(actors.items(), key=lambda kv: -kv[1]) if v > 0}}


def run_row(args: argparse.Namespace, num_workers: int, storage: str, elastic: bool = False) -> dict:
    from digan.train import launch

    log_every = args.log_every
    overrides = [
        f"dist.num_workers={num_workers}", f"dist.cpus_per_worker={args.threads}",
        f"dist.zero_stage={args.zero_stage}", f"dist.precision={args.precision}",
        f"train.batch_size={args.batch_per_worker * num_workers}",
        f"train.total_kimg={args.steps * args.batch_per_worker * num_workers / 1000}",
        f"train.log_every_steps={log_every}", "train.checkpoint_kimg=1000000", "train.sample_kimg=1000000",
        "metrics.metrics=[]", f"train.storage_path={storage}",
        f"train.run_name=scaling-w{num_workers}{'-elastic' if elastic else ''}",
        f"data.num_workers={args.data_workers}", "dist.max_failures=0",
    ] + ([f"dist.min_workers={max(1, num_workers - 1)}"] if elastic else [])
    cfg = load_config(args.preset, overrides + args.overrides)
    before = load_avg()
    stats_file = Path(storage) / cfg.train.run_name / "stats.jsonl"
    sampler = CpuSampler(stats_file) if sys.platform.startswith("linux") else None
    t0 = time.time()
    launch(cfg, handle_signals=False)
    wall = time.time() - t0
    cpu = sampler.shares() if sampler is not None else {}
    stats = [json.loads(line) for line in stats_file.read_text().splitlines()]
    windows = [s for s in stats if s["step"] % log_every == 0][1:]  # drop the first window (warm-up)
    if not windows:
        raise SystemExit(f"--steps {args.steps} leaves no measured window after warm-up (log every {log_every})")
    return {"workers": num_workers, "elastic": elastic, "samples_per_s": statistics.median(s["samples_per_s"] for s in windows),
            "it_per_s": statistics.median(s["it_per_s"] for s in windows),
            "data_wait_frac": statistics.median(s["data_wait_frac"] for s in windows),
            # samples per CPU-second of the training processes (cpu_util is the per-rank mean)
            "samples_per_cpu_s": statistics.median(s["samples_per_s"] / (s["cpu_util"] * num_workers)
                                                   for s in windows),
            "cpu_util": statistics.median(s["cpu_util"] for s in windows),
            "windows": len(windows), "wall_s": wall, "load_before": before, "load_after": load_avg(), **cpu}


def ceiling_worker(args: argparse.Namespace) -> None:
    """One independent copy of a worker's step (no Ray, no DeepSpeed); prints its it/s as JSON."""
    import torch

    from digan.training import SingleProcessTrainer, d_step, g_step

    torch.set_num_threads(args.threads)
    b = args.batch_per_worker
    cfg = load_config(args.preset, [f"train.batch_size={b}", "dist.num_workers=1"] + args.overrides)
    from digan.malloc import configure_malloc

    configure_malloc(cfg.dist, "cpu")  # as the Ray workers do
    tr = SingleProcessTrainer(cfg, torch.device("cpu"), seed=0)
    res = cfg.model.resolution
    real, dt = torch.rand(b, 2, 3, res, res) * 2 - 1, torch.rand(b)

    def step(i: int) -> None:
        d_step(tr.G, tr.D.img, tr.D.mot, tr.d_updater, tr.loss, real, dt, tr.loss.r1_due(i))
        g_step(tr.G, tr.D.img, tr.D.mot, tr.g_updater, tr.loss, b)
        tr.ema.update(tr.G, (i + 1) * b)

    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.ceiling_steps):
        step(i)
    print(json.dumps({"it_per_s": args.ceiling_steps / (time.perf_counter() - t0)}), flush=True)


def measure_ceiling(args: argparse.Namespace, n: int) -> tuple[float, list[float]]:
    """(mean it/s of one copy alone, mean it/s per copy with n copies at once), over the rounds."""
    import subprocess

    cmd = [sys.executable, __file__, "--ceiling-worker", "--preset", args.preset, "--batch-per-worker",
           str(args.batch_per_worker), "--threads", str(args.threads), "--ceiling-steps", str(args.ceiling_steps),
           *args.overrides]

    def run(copies: int) -> list[float]:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit("ceiling measurement failed")
        return [json.loads(o.strip().splitlines()[-1])["it_per_s"] for o in outs]

    alone, together = [], []
    for _ in range(args.ceiling_rounds):
        alone += run(1)
        together += run(n)
    return statistics.mean(alone), together


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo-64")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-per-worker", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="training steps per row")
    p.add_argument("--log-every", type=int, default=5, help="steps per measured window")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per worker")
    p.add_argument("--data-workers", type=int, default=1, help="DataLoader processes per worker")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--ceiling-steps", type=int, default=30,
                   help="steps per copy for the machine's ceiling on CPU (0 = skip it)")
    p.add_argument("--ceiling-rounds", type=int, default=2, help="alone / together alternations for the ceiling")
    p.add_argument("--elastic", action="store_true",
                   help="also run the largest count as an elastic group (dist.min_workers = count - 1) and print "
                        "what the elastic machinery costs against the fixed-size row")
    p.add_argument("--repeats", type=int, default=0,
                   help="with --elastic: alternate this many more fixed and elastic rows of the largest count and "
                        "compare medians (samples/s and samples per CPU-second)")
    p.add_argument("--machinery-steps", type=int, default=60,
                   help="with --elastic: steps of each kind for the in-step cost of the count-independent draws")
    p.add_argument("--ceiling-worker", action="store_true", help=argparse.SUPPRESS)  # internal: one copy
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="more config overrides")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.ceiling_worker:
        ceiling_worker(args)
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"weak scaling, {args.preset}, {args.batch_per_worker} pairs per worker, ZeRO-{args.zero_stage} "
          f"{args.precision}, {args.steps} steps per row, device: {device}", flush=True)
    from digan.distributed.cluster import init_ray

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
            if "machine_cores_busy" in r:
                print(f"      CPU during the measured windows: {r['machine_cores_busy']:.2f} of {os.cpu_count()} cores "
                      f"busy = training workers {r['worker_cores']:.2f} + their data loaders {r['loader_cores']:.2f} "
                      f"+ everything else {r['other_cores']:.2f} (Ray's control plane and actors, other users)",
                      flush=True)
    print_efficiency(rows)
    if args.elastic:
        rows.append(elastic_row(args, rows, run_row))
        if args.machinery_steps > 0:
            rows[-1].update(elastic_cost(args, rows[-1]))
    if device.startswith("CPU") and args.ceiling_steps > 0:
        ceilings(args, rows)
    print(json.dumps({"rows": rows}))
    return 0


def print_efficiency(rows: list[dict]) -> None:
    """Weak-scaling efficiency of every row against the first (and its CPU-normalised variant)."""
    rows = [r for r in rows if not r.get("elastic")]
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


def ceilings(args: argparse.Namespace, rows: list[dict]) -> None:
    """The machine's ceiling for each multi-worker row: independent copies of one worker's step at once."""
    print(f"\nthe machine's ceiling: independent copies of one worker's step (no Ray, no DeepSpeed, "
          f"{args.threads} thread(s) each), {args.ceiling_rounds} rounds")
    for r in [r for r in rows[1:] if not r.get("elastic")]:
        n = r["workers"]
        if n == rows[0]["workers"]:
            continue
        alone, together = measure_ceiling(args, n)
        r["ceiling"] = statistics.mean(together) / alone
        r["efficiency_vs_ceiling"] = r["efficiency"] / r["ceiling"]
        print(f"  {n} copies at once: {', '.join(f'{x:.2f}' for x in together)} it/s each vs {alone:.2f} alone "
              f"-> ceiling {100 * r['ceiling']:.1f} % of {n} x one copy; the {n}-worker run reaches "
              f"{100 * r['efficiency']:.1f} % = {100 * r['efficiency_vs_ceiling']:.1f} % of that ceiling")


if __name__ == "__main__":
    sys.exit(main())
