"""Train DIGAN on Ray Train with DeepSpeed-wrapped workers: the project's main job.

    python -m digan.train                                   # demo: demo-32 preset, 2 CPU workers, minutes
    python -m digan.train --config digan-128 data.source=s3://bucket/ucf101 train.storage_path=s3://bucket/runs
    ray job submit --working-dir . -- python -m digan.train --config digan-128 ...
    python -m digan.train --dry-run                         # resolved config + plan, no Ray work

Attaches to a running cluster when one is given (`dist.ray_address`, else RAY_ADDRESS as set under
`ray job submit`), otherwise starts a local one. Rerunning with the same `train.run_name` and
`train.storage_path` resumes from the latest checkpoint. SIGTERM (Slurm preemption) or Ctrl-C asks the
workers to checkpoint at the next step boundary and exit; a second signal aborts at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from digan.config import Config, add_config_args, config_from_args, dump_yaml, to_dict
from digan.distributed.cluster import (ElasticWait, StopFlag, init_ray, quiet_ray_false_alarms, startup_retries,
                                       worker_env)
from digan.storage import arrow_filesystem, display_path, is_s3, join


@dataclass
class TrainOutcome:
    """Where a finished (or stopped) run left its outputs, as paths a user can open or paste."""

    run_dir: str
    checkpoint: str | None
    step: int | None
    kimg: float | None
    tensorboard: str
    sample_video: str | None
    stopped: bool  # True when a signal stopped the run before train.total_kimg


def plan(cfg: Config) -> str:
    """What a run will do, in a few lines (printed by --dry-run and at start)."""
    d, t = cfg.dist, cfg.train
    gpu = {None: "GPU if the cluster has one", True: "GPU", False: "CPU"}[d.use_gpu]
    where = d.ray_address or os.environ.get("RAY_ADDRESS") or "a new local Ray cluster"
    workers = (f"{d.min_workers} to {d.num_workers} (elastic, resized every {d.resize_interval_s:g} s when nodes "
               "come or go)" if d.elastic else f"{d.num_workers}")
    share = "its share" if d.elastic else f"{t.batch_size // d.num_workers}"
    return "\n".join([
        f"plan: {workers} Ray Train worker(s) on {where} ({gpu}, {d.cpus_per_worker} CPU each), "
        f"DeepSpeed ZeRO-{d.zero_stage} {d.precision}",
        f"      global batch {t.batch_size} ({share} per worker), "
        f"{t.total_kimg:g} kimg = {_steps(t.total_kimg, t.batch_size)} steps, data {cfg.data.source}",
        f"      run {join(t.storage_path, t.run_name)}: checkpoint every {t.checkpoint_kimg:g} kimg"
        + (f" or {t.checkpoint_minutes:g} min" if t.checkpoint_minutes else "") + " (keep "
        f"{t.keep_checkpoints}), samples every {t.sample_kimg:g} kimg, metrics {cfg.metrics.metrics or 'off'}"
        + (f" every {cfg.metrics.interval_kimg:g} kimg" if cfg.metrics.metrics else ""),
    ])


def _steps(kimg: float, batch: int) -> int:
    return -(-int(round(kimg * 1000)) // batch)


class LaunchError(RuntimeError):
    """A problem found on the driver before any worker starts (one line, naming the key)."""


class RunError(RuntimeError):
    """The run could not go on (one line that says why); its checkpoints stay where they are."""


def _explain(error: BaseException, cfg: Config, use_gpu: bool) -> BaseException:
    """Ray Train's startup-timeout failure as one line; any other error as it is."""
    cause = getattr(error, "controller_failure", None)
    if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
        count = f"at least {cfg.dist.min_workers}" if cfg.dist.elastic else f"{cfg.dist.num_workers}"
        need = f"{count} workers x {cfg.dist.cpus_per_worker} CPU"
        return RunError(f"could not start {need}{' + 1 GPU' if use_gpu else ''} for "
                        f"{cfg.dist.worker_wait_s:g} s (dist.worker_wait_s): the cluster has too few free "
                        "resources (a lost node?); the run resumes from its last checkpoint when resubmitted")
    return error


def check_data(cfg: Config) -> None:
    """The shards against the config, here on the driver: a wrong clip length, resolution, format or a
    missing shard fails in seconds, before Ray starts any worker (the loaders repeat the same checks)."""
    from digan.data import check_source

    try:
        src = check_source(cfg.data, cfg.model.resolution)
    except (ValueError, OSError) as e:  # FileNotFoundError, PermissionError, S3 errors are OSErrors
        raise LaunchError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if cfg.model.num_classes > 0 and src.manifest is not None and "classes" in src.manifest:
        check_classes(cfg, src.manifest["classes"] or [])  # (manifests written before class tables have none)


def check_classes(cfg: Config, classes: list[str | None]) -> None:
    """A conditional run against the classes its manifest lists; fills in model.class_names (the checkpoints
    record them) from the manifest when the config gives none."""
    n = cfg.model.num_classes
    if not classes:
        raise LaunchError(f"model.num_classes={n}: data.source={cfg.data.source} has no class labels (build "
                          f"labelled shards, e.g. data-shards build ... --layout ucf101)")
    if len(classes) > n:
        raise LaunchError(f"model.num_classes={n}: data.source={cfg.data.source} has {len(classes)} classes")
    if not cfg.model.class_names:
        cfg.model.class_names = [c or f"class{i}" for i, c in enumerate(classes)] + \
            [f"class{i}" for i in range(len(classes), n)]


def check_storage(storage_path: str, cwd: str | None = None) -> None:
    """A relative train.storage_path is refused where the driver runs in Ray's working-dir cache (a `ray job
    submit --working-dir` driver): outputs would land in `.../runtime_resources/working_dir_files/_ray_pkg_<hash>/`
    on one node, lost with the cache, and a resubmission with edited code (another hash) would never resume."""
    if is_s3(storage_path) or os.path.isabs(os.path.expanduser(storage_path)):
        return
    cwd = cwd or os.getcwd()
    if "_ray_pkg_" in cwd or f"{os.sep}runtime_resources{os.sep}" in cwd:
        raise LaunchError(f"train.storage_path={storage_path!r} is relative and this driver runs in Ray's "
                          f"working-dir cache ({cwd}): outputs would be lost with it and a resubmission would "
                          "not resume; pass an absolute path on storage every node shares, or s3://bucket/prefix")


def launch(cfg: Config, handle_signals: bool = True, callbacks: list | None = None) -> TrainOutcome:
    """Run (or resume) `cfg` on Ray Train; blocks until done or stopped. Returns where the outputs are.

    `callbacks` are Ray Train `UserCallback`s (the sweep passes Tune's `TuneReportCallback`)."""
    quiet_ray_false_alarms()
    import ray

    if cfg.data.source == "demo":
        # Build the demo shards here, once, with the user watching; workers on this node find them.
        from digan.data import ensure_demo_shards

        print(f"demo data: {ensure_demo_shards(cfg.data, cfg.model.resolution)}", flush=True)
    check_storage(cfg.train.storage_path)
    check_data(cfg)
    from digan.data.source import s3_settings

    fs, storage_fs_path = arrow_filesystem(cfg.train.storage_path, s3_settings(cfg.data))
    init_ray(cfg)
    use_gpu = cfg.dist.use_gpu if cfg.dist.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    # The stop flag lives on the driver's node: nothing the workers depend on may die with another node.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    stop_flag = ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()
    if cfg.dist.elastic:
        ElasticWait.track()
    trainer = _trainer(cfg, fs, storage_fs_path, use_gpu, stop_flag, callbacks)
    print(plan(cfg), flush=True)
    result, stopped = _fit(trainer, stop_flag, handle_signals, cfg, use_gpu)
    return _outcome(fs, f"{storage_fs_path}/{cfg.train.run_name}", result.metrics or {}, stopped)


def _trainer(cfg: Config, fs, storage_fs_path: str, use_gpu: bool, stop_flag, callbacks: list | None):
    """The Ray Train TorchTrainer of the run: workers, storage, checkpoints kept, failure limits."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from digan.distributed.worker import train_loop_per_worker

    resources = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "stop_flag": stop_flag},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=(cfg.dist.min_workers, cfg.dist.num_workers) if cfg.dist.elastic else cfg.dist.num_workers,
            use_gpu=use_gpu, resources_per_worker=resources, elastic_resize_monitor_interval_s=cfg.dist.resize_interval_s),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_fs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures,
                                         controller_failure_limit=startup_retries(cfg.dist.worker_wait_s)),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": worker_env(use_gpu)},
            # Ray Train's per-report INFO lines would drown our progress line.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _fit(trainer, stop_flag, handle_signals: bool, cfg: Config, use_gpu: bool):
    """trainer.fit() in a thread, so that the main thread stays free to receive signals (ray.init replaced the
    SIGTERM handler with sys.exit, which would kill the run without a checkpoint). The first SIGTERM/SIGINT
    raises the stop flag (the workers checkpoint and exit), a second one aborts. Returns (result, stopped)."""
    import ray

    box: dict = {}
    requested = threading.Event()

    def _run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread
            box["error"] = e

    def _on_signal(signum, _frame) -> None:
        if requested.is_set():
            print(f"second {signal.Signals(signum).name}: aborting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        requested.set()
        print(f"{signal.Signals(signum).name}: checkpointing at the next step, then exiting "
              "(send again to abort)", file=sys.stderr, flush=True)

    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, _on_signal)
    thread = threading.Thread(target=_run, name="digan-fit", daemon=True)
    thread.start()
    d = cfg.dist
    watch = ElasticWait(cfg.train.run_name, d.worker_wait_s) if d.elastic and d.worker_wait_s > 0 else None
    try:
        flagged = False
        while thread.is_alive():
            thread.join(0.2)
            if requested.is_set() and not flagged:
                ray.get(stop_flag.set.remote())
                flagged = True
            if watch is not None and watch.expired():  # the fit thread is a daemon: it ends with this process
                raise RunError(f"could not run at least {d.min_workers} workers x {d.cpus_per_worker} CPU"
                               f"{' + 1 GPU' if use_gpu else ''} for {d.worker_wait_s:g} s (dist.worker_wait_s, "
                               "dist.min_workers): the cluster has too few free resources (a lost node?); the run "
                               "resumes from its last checkpoint when resubmitted")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in box:
        raise _explain(box["error"], cfg, use_gpu) from None
    return box["result"], requested.is_set()


def _outcome(fs, run_fs_path: str, metrics: dict, stopped: bool) -> TrainOutcome:
    from digan.distributed import checkpoint as ckpt

    latest = ckpt.find_latest(fs, run_fs_path)
    samples = _latest_sample(fs, run_fs_path)
    return TrainOutcome(
        run_dir=display_path(fs, run_fs_path),
        checkpoint=display_path(fs, latest) if latest else None,
        step=int(metrics["step"]) if "step" in metrics else None,
        kimg=float(metrics["kimg"]) if "kimg" in metrics else None,
        tensorboard=display_path(fs, f"{run_fs_path}/tensorboard"),
        sample_video=display_path(fs, samples) if samples else None,
        stopped=stopped,
    )


def _latest_sample(fs, run_fs_path: str) -> str | None:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(f"{run_fs_path}/samples", allow_not_found=True)
    videos = sorted(i.path for i in fs.get_file_info(sel) if i.path.endswith(".mp4"))
    return videos[-1] if videos else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m digan.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default="demo-32")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    cfg = config_from_args(args)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        print(plan(cfg))
        return 0
    t0 = time.time()
    try:
        out = launch(cfg)
    except LaunchError as e:
        print(f"digan.train: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"digan.train: {e}", file=sys.stderr)
        return 1
    state = "stopped" if out.stopped else "finished"
    print(f"\n{state} after {time.time() - t0:.0f} s at step {out.step} ({out.kimg} kimg)" if out.step is not None
          else f"\n{state} after {time.time() - t0:.0f} s")
    print(f"  run folder:   {out.run_dir}")
    print(f"  checkpoint:   {out.checkpoint}")
    print(f"  tensorboard:  {out.tensorboard}   (tensorboard --logdir {out.tensorboard})")
    print(f"  sample video: {out.sample_video}")
    if out.stopped:
        print("  rerun the same command to resume from the checkpoint")
    elif cfg.data.source == "demo":
        print(demo_outlook(cfg, out))
    return 0


def demo_outlook(cfg: Config, out: TrainOutcome) -> str:
    """What a finished demo run trained and what its samples can show (a new user cannot tell early noise
    from a bug), and the command that trains long enough to measure progress."""
    m, t = cfg.model, cfg.train
    steps = f"{out.step} steps" if out.step is not None else "its steps"
    return "\n".join([
        f"  trained:      {t.run_name}: {m.resolution}x{m.resolution} frames of {cfg.data.num_frames}-frame clips of the "
        f"embedded demo footage, {out.kimg if out.kimg is not None else t.total_kimg:g} kimg ({steps}, global "
        f"batch {t.batch_size}) on {cfg.dist.num_workers} worker(s)",
        "  expect:       a few kimg show that the pipeline runs, not a trained model: the samples are saturated",
        "                colour blobs with little motion; the footage's colours come by 40 kimg, moving shapes by",
        "                80-100 kimg. To train longer and measure real FVD16 and frame grids as it goes (100 kimg,",
        "                1-1.5 hours on 2 CPU cores; README, 'Does it learn?'):",
        "                python benchmarks/quality.py",
    ])


if __name__ == "__main__":
    sys.exit(main())
