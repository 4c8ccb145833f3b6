"""What the elastic machinery costs per step, for `scaling.py --elastic` (see its docstring): where it runs, in
the step (`machinery_worker`, one rank in a process of its own: `python benchmarks/elastic_cost.py PARAMS_JSON`)
and outside it (the driver's and Ray Train's actors' CPU in elastic rows against fixed ones, `elastic_row`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Callable

from common import load_avg  # (also puts the repository on sys.path)
from digan.config import load_config  # noqa: E402


def elastic_row(args: argparse.Namespace, rows: list[dict], run_row: Callable[..., dict]) -> dict:
    """The largest count as an elastic group (alternated with fixed rows, `--repeats`); what that costs against
    the fixed-size rows, compared by medians."""
    n = max(args.workers)
    fixed, elastic = [next(x for x in rows if x["workers"] == n and not x["elastic"])], []
    for i in range(args.repeats + 1):
        for is_elastic in ((True,) if i == 0 else (False, True)):
            with tempfile.TemporaryDirectory(prefix="digan-scaling-") as storage:
                r = run_row(args, n, storage, elastic=is_elastic)
            (elastic if is_elastic else fixed).append(r)
            control = control_cores(r)
            print(f"  {n} workers {'elastic' if is_elastic else 'fixed  '}: {r['samples_per_s']:8.2f} samples/s, "
                  f"{r['samples_per_cpu_s']:.2f} per CPU-s, driver + Ray Train's actors "
                  f"{'n/a' if control is None else f'{control:.3f}'} cores (load {r['load_before']} -> "
                  f"{r['load_after']})", flush=True)
    r = dict(elastic[-1])
    for key in ("samples_per_s", "samples_per_cpu_s"):
        f, e = statistics.median(x[key] for x in fixed), statistics.median(x[key] for x in elastic)
        r[f"elastic_overhead_{key}"] = 1 - e / f
        r[f"fixed_spread_{key}"] = (max(x[key] for x in fixed) - min(x[key] for x in fixed)) / f
    r["elastic_overhead"] = r["elastic_overhead_samples_per_s"]
    r["repeats"] = len(elastic)
    if all(control_cores(x) is not None for x in fixed + elastic):
        # What only an elastic group runs (Ray Train's resize checks in its controller, its run-state tracking,
        # the driver's bounded wait for min_workers) is CPU outside the workers: the extra cores it keeps busy,
        # as a share of what the workers compute with (an upper bound of what it can take from a step when it
        # shares their cores, as on this machine; on a GPU node it runs beside them).
        f, e = (statistics.median(control_cores(x) for x in rows_) for rows_ in (fixed, elastic))
        worker = statistics.median(x["worker_cores"] for x in fixed)
        r["control_cores_fixed"], r["control_cores_elastic"] = f, e
        r["elastic_control_frac"] = (e - f) / worker
        print(f"\noutside the step: the driver and Ray Train's actors keep {f:.3f} cores busy in a fixed group and "
              f"{e:.3f} in an elastic one (medians): {e - f:+.3f} cores = {100 * r['elastic_control_frac']:+.2f} % of "
              f"the {worker:.2f} cores the workers compute with", flush=True)
    print(f"\nelastic {n} workers (min {max(1, n - 1)}), medians of {len(elastic)} elastic and {len(fixed)} fixed rows: "
          f"end to end the elastic rows are {100 * r['elastic_overhead']:+.1f} % slower in samples/s "
          f"({100 * r['elastic_overhead_samples_per_cpu_s']:.1f} % per CPU-second); the fixed rows themselves "
          f"spread {100 * r['fixed_spread_samples_per_s']:.1f} % ({100 * r['fixed_spread_samples_per_cpu_s']:.1f} %)",
          flush=True)
    return r


def elastic_cost(args: argparse.Namespace, row: dict) -> dict:
    """The elastic machinery's cost per step, measured where it runs: in the step (`machinery_worker`) and
    outside it (the driver's and Ray Train's actors' extra CPU in the elastic rows, `elastic_row`)."""
    m = measure_machinery(args)
    outside = max(0.0, row.get("elastic_control_frac", 0.0))
    total = m["machinery_frac"] + outside
    print(f"\nthe elastic machinery per step: {100 * m['machinery_frac']:.2f} % in the step + {100 * outside:.2f} % "
          f"outside it = {100 * total:.2f} % (target < 2 %: {'met' if total < 0.02 else 'NOT met'}); the rows "
          f"end to end: {100 * row['elastic_overhead']:+.1f} % of samples/s against a spread of "
          f"{100 * row['fixed_spread_samples_per_s']:.1f} % among the fixed rows alone", flush=True)
    return {"machinery": m, "elastic_machinery_frac": total}


def control_cores(row: dict) -> float | None:
    """Cores the driver and Ray Train's own actors (controller, run-state tracking, synchronisation,
    autoscaling coordinator: every `ray::` process but the workers and Ray's node agents) kept busy in a row."""
    if "actor_cores" not in row:
        return None
    skip = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE")
    return row["driver_cores"] + sum(v for k, v in row["actor_cores"].items() if k not in skip)


def time_machinery() -> list[float]:
    """Wrap the count-independent draws (`KeyedLatents.begin_step/rows/draw`, DiffAugment's and xflip's draws with
    `rows`) in wall-clock timers (this process only); returns the one-element list their time is added to."""
    import inspect

    from digan.training import augment as aug
    from digan.training import latents as lat
    from digan.training import loss as loss_mod

    spent = [0.0]

    def timed(fn, only_with_rows: bool = False):
        signature = inspect.signature(fn)

        def wrapper(*a, **kw):
            if only_with_rows and signature.bind(*a, **kw).arguments.get("rows") is None:
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    for cls, name in ((lat.KeyedLatents, "begin_step"), (lat.KeyedLatents, "rows"), (lat.KeyedLatents, "draw")):
        setattr(cls, name, timed(getattr(cls, name)))
    aug.DiffAugment.sample = timed(aug.DiffAugment.sample, only_with_rows=True)
    loss_mod.random_xflip = timed(loss_mod.random_xflip, only_with_rows=True)
    return spent


def machinery_worker(params: dict) -> None:
    """What a step of one rank of a `count`-worker group spends on the machinery that makes its maths the same at
    any worker count (and so lets a group resize): the fakes' latents and the augmentation parameters drawn for
    the whole global batch and this rank's rows kept (`KeyedLatents`, `Rows`), and its rows put in the global
    minibatch-stddev group order (`recipe.group_order`). Plain PyTorch in one process (no Ray, no DeepSpeed,
    nothing else running), `steps` steps of each kind, alternated step by step:

    - keyed: the step as a rank of `count` workers takes it (rank 0's rows of the global batch);
    - local: the same step with every draw made locally for this rank's rows only, in its own order.

    Two figures: (1) the time spent inside the machinery's own functions during the keyed steps (wall-clock
    timers around them: an upper bound, as it includes the draws a local step makes anyway), as a fraction of
    the keyed step; (2) median keyed vs median local step time (the same thing measured end to end, with the
    machine's noise in it). Prints one JSON line."""
    import torch

    from digan.training import SingleProcessTrainer
    from digan.training import recipe

    torch.set_num_threads(params["threads"])
    b, count = params["batch_per_worker"], params["count"]
    cfg = load_config(params["preset"], [f"train.batch_size={b * count}", f"dist.num_workers={count}"]
                      + params["overrides"])
    from digan.malloc import configure_malloc

    configure_malloc(cfg.dist, "cpu")  # as the Ray workers do
    tr = SingleProcessTrainer(cfg, torch.device("cpu"), seed=0)
    keyed_latents, res = tr.latents, cfg.model.resolution
    real, dt, ids = torch.rand(b, 2, 3, res, res) * 2 - 1, torch.rand(b), torch.arange(b)  # rank 0's rows
    spent = time_machinery()

    def keyed() -> float:
        t0 = time.perf_counter()
        order = recipe.group_order(b, cfg.model.mbstd_group)
        r, d, i = (real, dt, ids) if order is None else (real[order], dt[order], ids[order])
        spent[0] += time.perf_counter() - t0
        tr.loss.latents = keyed_latents
        keyed_latents.begin_step(tr.step, i)
        recipe.train_step(tr.G, tr.D.img, tr.D.mot, tr.g_updater, tr.d_updater, tr.loss, tr.ema, r, d, tr.step,
                          tr.cur_nimg)
        return time.perf_counter() - t0

    def local() -> float:
        t0 = time.perf_counter()
        tr.loss.latents = None  # draws from the global RNG, this rank's rows only
        recipe.train_step(tr.G, tr.D.img, tr.D.mot, tr.g_updater, tr.d_updater, tr.loss, tr.ema, real, dt, tr.step,
                          tr.cur_nimg)
        return time.perf_counter() - t0

    times = {"keyed": [], "local": []}
    for i in range(params["steps"] + 3):
        if i == 3:  # after warm-up
            spent[0], times = 0.0, {"keyed": [], "local": []}
        # both kinds at the same step index (lazy R1 steps alike), in alternating order
        for kind in (("keyed", "local") if i % 2 else ("local", "keyed")):
            times[kind].append(keyed() if kind == "keyed" else local())
        tr.step += 1
        tr.cur_nimg += b * count
    keyed_med, local_med = statistics.median(times["keyed"]), statistics.median(times["local"])
    print(json.dumps({"steps": len(times["keyed"]), "count": count, "step_s": statistics.mean(times["keyed"]),
                      "machinery_s": spent[0] / len(times["keyed"]),
                      "keyed_median_s": keyed_med, "local_median_s": local_med}), flush=True)


def measure_machinery(args: argparse.Namespace) -> dict:
    """`machinery_worker` in a process of its own; prints and returns its figures."""
    import subprocess

    params = {"preset": args.preset, "batch_per_worker": args.batch_per_worker, "count": max(args.workers),
              "threads": args.threads, "steps": args.machinery_steps, "overrides": args.overrides}
    cmd = [sys.executable, __file__, json.dumps(params)]
    before = load_avg()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit("machinery measurement failed")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    m["machinery_frac"] = m["machinery_s"] / m["step_s"]
    m["keyed_vs_local"] = m["keyed_median_s"] / m["local_median_s"] - 1
    print(f"\nin the step, one rank of {m['count']} ({args.threads} thread(s), {m['steps']} steps of each kind "
          f"alternated, no Ray): the count-independent draws and group order take {1e3 * m['machinery_s']:.2f} ms "
          f"of a {1e3 * m['step_s']:.0f} ms step = {100 * m['machinery_frac']:.2f} % (timed inside their functions; "
          f"an upper bound); median step keyed {1e3 * m['keyed_median_s']:.1f} ms vs all-local draws "
          f"{1e3 * m['local_median_s']:.1f} ms ({100 * m['keyed_vs_local']:+.2f} %, with the machine's noise; load "
          f"{before} -> {load_avg()})",
          flush=True)
    return m


if __name__ == "__main__":
    machinery_worker(json.loads(sys.argv[1]))
