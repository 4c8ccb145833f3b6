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
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from digan.config import Config, add_config_args, config_from_args, dump_yaml, to_dict
from digan.storage import display_path, is_s3, join


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
    return "\n".join([
        f"plan: {d.num_workers} Ray Train worker(s) on {where} ({gpu}, {d.cpus_per_worker} CPU each), "
        f"DeepSpeed ZeRO-{d.zero_stage} {d.precision}",
        f"      global batch {t.batch_size} ({t.batch_size // d.num_workers} per worker), "
        f"{t.total_kimg:g} kimg = {_steps(t.total_kimg, t.batch_size)} steps, data {cfg.data.source}",
        f"      run {join(t.storage_path, t.run_name)}: checkpoint every {t.checkpoint_kimg:g} kimg"
        + (f" or {t.checkpoint_minutes:g} min" if t.checkpoint_minutes else "") + " (keep "
        f"{t.keep_checkpoints}), samples every {t.sample_kimg:g} kimg, metrics {cfg.metrics.metrics or 'off'}"
        + (f" every {cfg.metrics.interval_kimg:g} kimg" if cfg.metrics.metrics else ""),
    ])


def _steps(kimg: float, batch: int) -> int:
    return -(-int(round(kimg * 1000)) // batch)


# ----------------------------------------------------------------------------------------------------
# Stop requests: a signal in the driver sets a flag in a tiny actor that rank 0 polls every step.


class _StopFlag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment every worker needs (DeepSpeed's accelerator; the same Ray auth mode as the driver)."""
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 reroutes print() through logging, which showed every
    # progress line twice on the driver; plain stdout is forwarded by Ray once.
    env = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("RAY_AUTH_MODE", "DS_ACCELERATOR"):
        if k in os.environ:
            env.setdefault(k, os.environ[k])
    return env


# Ray Train V2's controller starts a PreemptionWatcher actor (max_restarts=-1) with the Train workers' actor
# handles as constructor arguments, and Ray core logs that at ERROR level in every run ("core_worker.cc: Actor
# with class name: 'PreemptionWatcher' ... has constructor arguments in the object store and max_restarts > 0",
# ray-project/ray#53727) although the run is fine: any actor handle passed to a restartable actor's constructor
# triggers it (the handles are not data that can be lost), and nothing of ours reaches that actor. The watcher
# itself is kept: it is how Ray Train notices node drains (spot/autoscaler preemption).
# Ray's documented RAY_DEDUP_LOGS_SKIP_REGEX drops exactly that line from the driver's console; it stays in the
# controller's log file. Ray reads the variable when it is first imported in this process.
_RAY_FALSE_ALARM = r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store"


def quiet_ray_false_alarms() -> None:
    """Keep Ray's known false-alarm ERROR line off the console; call before this process imports ray."""
    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if not current:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = _RAY_FALSE_ALARM
    elif _RAY_FALSE_ALARM not in current:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{current}|{_RAY_FALSE_ALARM}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(cfg: Config) -> None:
    """Attach to `dist.ray_address` / RAY_ADDRESS, else start a new local cluster bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # address="local": never attach by accident to another cluster `ray start`ed on this machine.
    # Ray Train's placement-group cleaner and Tune find the state API through RAY_API_SERVER_ADDRESS; without it
    # they guess by scanning local processes, which fails (and leaks placement groups, hanging the next run)
    # as soon as a second Ray instance runs on the machine. So pin the dashboard port and tell every process.
    port = _free_port()
    ray.init(
        address="local",
        # Enough CPU slots for the workers even on a small laptop.
        num_cpus=max(os.cpu_count() or 1, cfg.dist.num_workers * cfg.dist.cpus_per_worker),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


class LaunchError(RuntimeError):
    """A problem found on the driver before any worker starts (one line, naming the key)."""


class RunError(RuntimeError):
    """The run could not go on (one line that says why); its checkpoints stay where they are."""


# Ray Train gives a worker group this long to start (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S in the
# controller's environment, 60 s by default), then retries the start as a controller failure.
WORKER_START_TIMEOUT_S = 60.0


def startup_retries(worker_wait_s: float) -> int:
    """Ray's controller_failure_limit for `dist.worker_wait_s` (Ray's default, -1, retries forever: a run whose
    node is gone for good would sit in RUNNING, its controller logging startup timeouts)."""
    return -1 if worker_wait_s <= 0 else max(1, math.ceil(worker_wait_s / WORKER_START_TIMEOUT_S))


def _explain(error: BaseException, cfg: Config) -> BaseException:
    """Ray Train's startup-timeout failure as one line; any other error as it is."""
    cause = getattr(error, "controller_failure", None)
    if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
        need = f"{cfg.dist.num_workers} workers x {cfg.dist.cpus_per_worker} CPU"
        return RunError(f"could not start {need}{' + 1 GPU' if cfg.dist.use_gpu else ''} for "
                        f"{cfg.dist.worker_wait_s:g} s (dist.worker_wait_s): the cluster has too few free "
                        "resources (a lost node?); the run resumes from its last checkpoint when resubmitted")
    return error


def check_data(cfg: Config) -> None:
    """The shards against the config, here on the driver: a wrong clip length, resolution, format or a
    missing shard fails in seconds, before Ray starts any worker (the loaders repeat the same checks)."""
    from digan.data import check_source

    try:
        check_source(cfg.data, cfg.model.resolution)
    except (ValueError, OSError) as e:  # FileNotFoundError, PermissionError, S3 errors are OSErrors
        raise LaunchError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


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
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from digan.distributed import checkpoint as ckpt
    from digan.distributed.worker import train_loop_per_worker

    if cfg.data.source == "demo":
        # Build the demo shards here, once, with the user watching; workers on this node find them.
        from digan.data import ensure_demo_shards

        print(f"demo data: {ensure_demo_shards(cfg.data, cfg.model.resolution)}", flush=True)
    check_storage(cfg.train.storage_path)
    check_data(cfg)

    fs, storage_fs_path = ckpt.resolve_storage(cfg.train.storage_path, cfg.data.s3_endpoint_url, cfg.data.s3_region)
    init_ray(cfg)
    use_gpu = cfg.dist.use_gpu if cfg.dist.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    resources = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    # The stop flag lives on the driver's node: nothing the workers depend on may die with another node.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    stop_flag = ray.remote(num_cpus=0)(_StopFlag).options(scheduling_strategy=here).remote()

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "stop_flag": stop_flag},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_fs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures,
                                         controller_failure_limit=startup_retries(cfg.dist.worker_wait_s)),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": _worker_env(use_gpu)},
            # Ray Train's per-report INFO lines would drown our progress line.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    print(plan(cfg), flush=True)

    # fit() runs in a thread so that the main thread stays free to receive signals (ray.init replaced
    # the SIGTERM handler with sys.exit, which would kill the run without a checkpoint).
    box: dict = {}
    requested = threading.Event()

    def _fit() -> None:
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
    thread = threading.Thread(target=_fit, name="digan-fit", daemon=True)
    thread.start()
    try:
        flagged = False
        while thread.is_alive():
            thread.join(0.2)
            if requested.is_set() and not flagged:
                ray.get(stop_flag.set.remote())
                flagged = True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in box:
        raise _explain(box["error"], cfg) from None
    result = box["result"]

    run_fs_path = f"{storage_fs_path}/{cfg.train.run_name}"
    latest = ckpt.find_latest(fs, run_fs_path)
    metrics = result.metrics or {}
    samples = _latest_sample(fs, run_fs_path)
    return TrainOutcome(
        run_dir=display_path(fs, run_fs_path),
        checkpoint=display_path(fs, latest) if latest else None,
        step=int(metrics["step"]) if "step" in metrics else None,
        kimg=float(metrics["kimg"]) if "kimg" in metrics else None,
        tensorboard=display_path(fs, f"{run_fs_path}/tensorboard"),
        sample_video=display_path(fs, samples) if samples else None,
        stopped=requested.is_set(),
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
        "  expect:       a few kimg show that the pipeline runs, not a trained model: the samples are coloured",
        "                texture with little motion. To train longer and measure real FVD16 and frame grids as",
        "                it goes (about an hour on 2 CPU cores; README, 'Does it learn?'):",
        "                python benchmarks/quality.py",
    ])


if __name__ == "__main__":
    sys.exit(main())
