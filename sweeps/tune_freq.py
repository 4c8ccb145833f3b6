"""Sweep DIGAN's time frequency sigma_t and R1 weight gamma with Ray Tune + Optuna (TPE) + ASHA.

Each trial runs the same training as the main job: a multi-worker Ray Train `TorchTrainer` with DeepSpeed
engines, launched from a Tune function trainable (the Ray Train V2 pattern), reporting the evaluation metric
computed during training. ASHA stops weak trials early on that metric.

    python sweeps/tune_freq.py --config demo-32 --num-samples 16 --max-concurrent 2 \
        --study-storage runs/sweeps/freq.journal                       # resumable Optuna study
    python sweeps/tune_freq.py --config demo-32 --resume               # finish an interrupted sweep

Search space: by default sigma_t ~ log-uniform(0.03, 3) and R1 gamma ~ log-uniform(0.01, 30). Change it
with repeated `--param key=dist:low:high` flags (dist: loguniform, uniform, int, choice with `a,b,c`) or a
YAML file (`--space`). Output: a table of trials (printed and CSV) and the best configuration as a YAML
file that `python -m digan.train --config best.yaml` accepts as is.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python sweeps/tune_freq.py` from a checkout: make `digan` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from digan.config import Config, ConfigError, add_config_args, config_from_args, dump_yaml, to_dict
from digan.storage import is_s3, join, resolve
from sweeps.results import print_table, trials_table
from sweeps.space import DEFAULT_SPACE, build_distributions, make_study_storage, parse_param, trial_config

# ----------------------------------------------------------------------------------------------------
# The trial: a Tune function trainable that drives one Ray Train run (Train V2 pattern).


def run_trial(config: dict[str, Any]) -> None:
    """One trial = the main job's TorchTrainer with this trial's overrides, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from digan.train import launch

    class MetricReportCallback(TuneReportCallback):
        """Forward to Tune only the Train reports that carry the sweep's metric.

        The worker reports losses every few steps but the metric only every `metrics.interval_kimg`; Tune's
        searcher and scheduler need the metric in every result, so one Tune iteration = one evaluation."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    metric = config.pop("__metric__")
    base = config.pop("__base__")
    cfg = trial_config(base, config)
    trial_name = ray.tune.get_context().get_trial_name()
    # A deterministic Train run name: a trial re-run after `--resume` continues from its Train checkpoint.
    cfg.train.run_name = f"train-{trial_name}"
    launch(cfg, handle_signals=False, callbacks=[MetricReportCallback()])


# ----------------------------------------------------------------------------------------------------
# CLI.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--param", action="append", default=[], metavar="KEY=DIST:LOW:HIGH",
                   help="a search dimension (repeatable); replaces the default sigma_t/gamma space")
    g.add_argument("--space", metavar="YAML", help="search space file: {key: {type, low, high | values}}")
    g.add_argument("--points", metavar="YAML", help="configs to evaluate first: a list of {key: value} maps")
    g.add_argument("--metric", default=None, help="metric to optimise (default: proxy_fvd16 or fvd16 per config)")
    g.add_argument("--mode", default="min", choices=["min", "max"])
    g.add_argument("--num-samples", type=int, default=8, help="number of trials")
    g.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    g.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    g = p.add_argument_group("early stopping (ASHA on the metric reported during training; time = kimg)")
    g.add_argument("--max-kimg", type=float, default=None, help="longest trial in kimg (default: train.total_kimg)")
    g.add_argument("--grace-kimg", type=float, default=None,
                   help="kimg before a trial can be stopped (default: metrics.interval_kimg)")
    g.add_argument("--reduction-factor", type=float, default=2.0)
    g = p.add_argument_group("storage")
    g.add_argument("--name", default="tune-freq", help="sweep name (folder under --storage-path)")
    g.add_argument("--storage-path", default=None, help="sweep results folder or s3:// (default: train.storage_path/sweeps)")
    g.add_argument("--study-storage", default=None, metavar="PATH|URL",
                   help="Optuna storage: a .db/.sqlite file, a journal file (NFS-safe) or an RDB URL")
    g.add_argument("--study-name", default=None, help="Optuna study name (default: --name)")
    g.add_argument("--resume", action="store_true", help="resume an interrupted sweep (Tuner.restore)")
    g.add_argument("--out", default=None, help="where trials.csv and best.yaml go (default: the sweep folder)")
    return p.parse_args(argv)


class SweepError(ValueError):
    """A bad sweep request (one line)."""


def main(argv=None) -> int:
    args = parse_args(argv)
    base = config_from_args(args)
    try:
        dists, points, metric = _search(args, base)
    except (SweepError, ConfigError, OSError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    storage_path = resolve(args.storage_path) if args.storage_path else join(base.train.storage_path, "sweeps")
    if args.dry_run:
        print(dump_yaml(base))
        print(f"sweep {args.name}: {args.num_samples} trials, {args.max_concurrent} at once, metric {metric} ({args.mode})")
        for k, d in dists.items():
            print(f"  {k}: {d}")
        print(f"results in {storage_path}/{args.name}; Optuna storage: {args.study_storage or 'in memory'}")
        return 0

    from digan.distributed.cluster import init_ray, quiet_ray_false_alarms

    quiet_ray_false_alarms()  # before ray is imported here
    init_ray(base)
    sweep_path = f"{storage_path.rstrip('/')}/{args.name}"
    tuner = _tuner(args, base, dists, points, metric, storage_path, sweep_path)
    if tuner is None:
        print(f"sweep error: nothing to resume at {sweep_path}", file=sys.stderr)
        return 2
    results = tuner.fit()
    out = Path(args.out).expanduser().resolve() if args.out else (Path.cwd() if is_s3(sweep_path) else Path(sweep_path))
    return _write_results(args, base, results, dists, metric, out)


def _search(args: argparse.Namespace, base: Config) -> tuple[dict, list | None, str]:
    """The search space (Optuna distributions), the points to try first, and the metric; checked."""
    space = dict(DEFAULT_SPACE)
    if args.space:
        space = yaml.safe_load(Path(args.space).read_text()) or {}
    if args.param:
        space = dict(parse_param(s) for s in args.param)
    dists = build_distributions(space, base)
    points = yaml.safe_load(Path(args.points).read_text()) if args.points else None
    for pt in points or []:
        trial_config(to_dict(base), pt)
    if args.max_kimg is not None and args.max_kimg <= 0 or args.grace_kimg is not None and args.grace_kimg <= 0:
        raise SweepError("--max-kimg and --grace-kimg must be > 0")
    if (args.grace_kimg or 0) > (args.max_kimg or base.train.total_kimg):
        raise SweepError(f"--grace-kimg={args.grace_kimg} exceeds the trial length "
                         f"({args.max_kimg or base.train.total_kimg} kimg)")
    if base.metrics.metrics == []:
        raise SweepError("metrics.metrics is empty: the sweep needs a metric reported during training")
    metric = args.metric or (("proxy_" if base.metrics.detector == "proxy" else "") + base.metrics.metrics[0])
    return dists, points, metric


def _tuner(args: argparse.Namespace, base: Config, dists: dict, points: list | None, metric: str,
           storage_path: str, sweep_path: str):
    """A new Tuner (Optuna TPE + ASHA over kimg), or the interrupted one restored (None: nothing to restore)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    trainable = tune.with_parameters(_trainable, base=to_dict(base), metric=metric)
    # The driver of each trial only waits on its Train workers: a sliver of a CPU, so it never starves them.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    if args.resume:
        if not tune.Tuner.can_restore(sweep_path):
            return None
        return tune.Tuner.restore(sweep_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    max_kimg = args.max_kimg or base.train.total_kimg
    grace_kimg = args.grace_kimg or min(base.metrics.interval_kimg, max_kimg)
    searcher = OptunaSearch(
        space=dists, metric=metric, mode=args.mode,
        sampler=optuna.samplers.TPESampler(seed=args.seed),
        study_name=args.study_name or args.name, storage=make_study_storage(args.study_storage),
        points_to_evaluate=points,
    )
    # Time is kimg (reported at every log step); the metric arrives every metrics.interval_kimg, and
    # ASHA judges a trial at a rung with the first metric report at or past the rung's kimg.
    scheduler = ASHAScheduler(time_attr="kimg", metric=metric, mode=args.mode, max_t=max_kimg,
                              grace_period=grace_kimg, reduction_factor=args.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=args.num_samples,
                                    max_concurrent_trials=args.max_concurrent),
        run_config=tune.RunConfig(name=args.name, storage_path=storage_path,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _write_results(args: argparse.Namespace, base: Config, results, dists: dict, metric: str, out: Path) -> int:
    """trials.csv and best.yaml (or trials.partial.csv and no best, when interrupted); the exit code."""
    rows = trials_table(results, metric, list(dists), args.max_kimg or base.train.total_kimg)
    print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    # Interrupted (Ctrl-C / SIGUSR1: Tune stops gracefully and returns what it has): nothing that looks final.
    finished = sum(r["status"] != "UNFINISHED" for r in rows)
    partial = finished < max(len(rows), args.num_samples)
    with open(out / ("trials.partial.csv" if partial else "trials.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
    if partial:
        print(f"sweep interrupted: {finished} of {args.num_samples} trials finished ({out / 'trials.partial.csv'}); "
              "no best.yaml: rerun with --resume to complete it", file=sys.stderr)
        return 130
    (out / "trials.partial.csv").unlink(missing_ok=True)
    ok = [r for r in rows if r["status"] != "ERROR" and isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
    if not ok:
        print("no trial finished with a finite metric", file=sys.stderr)
        return 1
    best = (min if args.mode == "min" else max)(ok, key=lambda r: r[metric])
    best_cfg = trial_config(to_dict(base), {k: best[k] for k in dists})
    best_cfg.train.run_name = f"{args.name}-best"
    (out / "best.yaml").write_text(f"# best of sweep {args.name}: {metric}={best[metric]:.6g} ({best['trial']})\n"
                                   + dump_yaml(best_cfg))
    print(f"best: {', '.join(f'{k}={best[k]:.4g}' if isinstance(best[k], float) else f'{k}={best[k]}' for k in dists)}"
          f"  {metric}={best[metric]:.5g}")
    print(f"trials table: {out / 'trials.csv'}\nbest config:  {out / 'best.yaml'}")
    return 0


def _trainable(config: dict[str, Any], base: dict[str, Any], metric: str) -> None:
    run_trial({**config, "__base__": base, "__metric__": metric})


if __name__ == "__main__":
    sys.exit(main())
