"""The per-worker training loop that Ray Train runs on every rank (`train_loop_per_worker`).

Build order (one function per block below): config -> rank/device -> models (same seed on every rank)
-> G_ema copy -> DeepSpeed engines (G; D_I + D_M in one engine) -> loss with keyed latents -> data of
this rank -> resume from Ray's latest checkpoint -> loop -> final checkpoint.

Each iteration runs the framework-free recipe (`digan.training.train_step`) in the official phase
order: one G step with D frozen, one D step, on lazy-R1 iterations D's separate R1 step (or R1 folded
into the D step with loss.r1_schedule=folded), the EMA update; every forward goes through
`engine.module`, the engines only do `backward` and `step` (DeepSpeedUpdater), once per phase. Step boundaries where
something happens (log, checkpoint, sample, metrics, stop) are functions of the step count and of the
SIGTERM flag broadcast from rank 0, so every rank takes the same branches and calls
`ray.train.report` the same number of times (it is a barrier).

Why both discriminators share one engine: the official D phases (Dmain, Dreg) update D_I and D_M with
one optimizer from one summed loss each, and a DeepSpeed engine takes exactly one `backward` per
`step`. One engine keeps that shape (per phase one backward of the summed loss, one step, one set of
all-reduce buckets), where two engines would need either two forward/backward passes or `retain_graph`
tricks.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from digan.config import Config, from_dict
from digan.distributed import checkpoint as ckpt
from digan.distributed.run_logger import RunLogger
from digan.distributed.run_state import TrainState, restore, save_checkpoint
from digan.distributed.runtime import GANRuntime
from digan.distributed.utils import any_rank, batch_slice, dist_mean, dist_sum
from digan.malloc import configure_malloc


# ----------------------------------------------------------------------------------------------------
# The loop.


def _crossed(prev_nimg: int, cur_nimg: int, interval_kimg: float) -> bool:
    """True when [prev, cur) crossed a multiple of interval_kimg (in images)."""
    every = interval_kimg * 1000
    return math.floor(cur_nimg / every + 1e-9) > math.floor(prev_nimg / every + 1e-9)


def _endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch of a resampled loader (each epoch is the same number of batches on every rank)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training data stream produced no batch in a whole epoch")


class StopPoller:
    """Rank 0 polls the driver's stop-flag actor without blocking; the answer is all-reduced to every rank.

    The question is always in flight: each step rank 0 only looks whether the last answer has arrived
    (`ray.wait(timeout=0)`) and asks again. A blocking `ray.get` per step put an actor round trip on the
    critical path of every rank (the others wait at the all-reduce), which on a loaded machine cost
    several percent of the step. A stop request is seen one or two steps later instead.
    """

    def __init__(self, flag_actor, rank: int):
        self.flag, self.rank = flag_actor, rank
        self._pending = None

    def should_stop(self, time_due: bool = False) -> tuple[bool, bool]:
        """(stop requested, rank 0's `time_due`), the same on every rank (one all-reduce for both)."""
        local = False
        if self.flag is not None and self.rank == 0:
            import ray

            try:
                if self._pending is not None:
                    ready, _ = ray.wait([self._pending], timeout=0)
                    if ready:
                        local = bool(ray.get(self._pending))
                        self._pending = None
                if self._pending is None and not local:
                    self._pending = self.flag.is_set.remote()
            except ray.exceptions.RayActorError as e:  # the driver is gone: train on, checkpoints continue
                print(f"stop flag unreachable ({type(e).__name__}): no more stop requests are seen", flush=True)
                self.flag, self._pending = None, None
        return any_rank(local, time_due and self.rank == 0)


def _quiet_report_logs() -> None:
    """Ray 2.60 logs every `ray.train.report` at INFO (with all metrics) under a logger named after its file
    path instead of `ray.train.*`, so RunConfig's LoggingConfig does not reach it; it would bury the
    progress line. Raise that one logger to WARNING."""
    import logging

    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on every rank. `loop_config = {"config": to_dict(cfg), "stop_flag": actor}`."""
    _quiet_report_logs()
    cfg = from_dict(loop_config["config"])
    ckpt.clean_stale_staging()
    run = _start(cfg)
    stopper = StopPoller(loop_config.get("stop_flag"), run.rank)
    keys_log = None
    if cfg.train.log_data_keys:  # which clips each step saw, per rank (an audit; local storage only)
        if not run.logger.is_local:
            raise ValueError("train.log_data_keys: needs a local train.storage_path")
        os.makedirs(run.logger.run_fs_path, exist_ok=True)
        keys_log = open(os.path.join(run.logger.run_fs_path, f"data_keys-rank{run.rank}.jsonl"), "a", buffering=1)
    try:
        _loop(cfg, run, stopper, keys_log)
    finally:
        run.logger.close()
        if keys_log is not None:
            keys_log.close()


@dataclass
class _Run:
    """One rank's part of the run: who it is, its engines, counters, data and (rank 0) outputs."""

    rank: int
    world_size: int
    rt: GANRuntime
    state: TrainState
    loader: Any
    logger: RunLogger


def _start(cfg: Config) -> _Run:
    """Rank and device, run outputs, engines, this rank's data; resumed from Ray's latest registered checkpoint
    (a retry after a failure, or a rerun of the name)."""
    import ray.train
    import ray.train.torch

    from digan.data import build_pair_loader

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.dist.cpus_per_worker)
    configure_malloc(cfg.dist, device)
    logger = RunLogger(cfg, ctx.get_storage(), enabled=rank == 0)
    rt = GANRuntime(cfg, rank, world_size, device)
    state = TrainState()
    # This rank's shard stream (resampled or exact epochs: every rank runs the same number of steps).
    # Streams of the largest group (dist.num_workers): a smaller elastic group reads the same global batches.
    streams = [batch_slice(cfg.train.batch_size, cfg.dist.num_workers, v, cfg.model.mbstd_group)
               for v in range(cfg.dist.num_workers)]
    loader = build_pair_loader(cfg.data, cfg.model.resolution, rt.batch_per_worker, rank, world_size, cfg.train.seed,
                               batch_start=rt.batch_start, global_batch=cfg.train.batch_size,
                               num_classes=cfg.model.num_classes, streams=streams)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restore(d, rt, state, loader, rank, world_size)
        state.resumed_from.append(state.step)
        logger.resume_at(state.step)
        if rank == 0:
            print(f"resumed from {checkpoint.path} at step {state.step} (kimg {state.cur_nimg / 1000:.3f})",
                  flush=True)
    rt.step, rt.cur_nimg = state.step, state.cur_nimg
    return _Run(rank, world_size, rt, state, loader, logger)


def _loop(cfg: Config, run: _Run, stopper: StopPoller, keys_log) -> None:
    """Steps until train.total_kimg (or a stop request). Every boundary decision (log, checkpoint, sample,
    metrics, stop) is a function of the step count and of flags all-reduced from rank 0, so every rank takes
    the same branches and calls `ray.train.report` (a barrier) the same number of times."""
    rt, state, loader, logger = run.rt, run.state, run.loader, run.logger
    total_nimg = int(round(cfg.train.total_kimg * 1000))
    batches = _endless(loader)
    window = _Window()
    last_ckpt = time.monotonic()  # train.checkpoint_minutes counts from here and from every checkpoint
    while state.cur_nimg < total_nimg:
        t0 = time.perf_counter()
        real_pair, real_dt, *labels = next(batches)  # + class indices when model.num_classes > 0
        t_data = time.perf_counter() - t0
        stats = rt.train_step(real_pair, real_dt, labels=labels[0] if labels else None)
        prev_nimg = state.cur_nimg
        state.step, state.cur_nimg = rt.step, rt.cur_nimg
        if keys_log is not None:
            keys_log.write(json.dumps({"step": state.step, "epoch": loader.epoch,
                                       "restarts": len(state.resumed_from), "keys": loader.last_keys}) + "\n")
        window.add(stats, t_data)

        # Rank 0's wall clock decides time-based checkpoints (shared with the stop flag's all-reduce).
        minutes = cfg.train.checkpoint_minutes
        stop, time_due = stopper.should_stop(minutes > 0 and time.monotonic() - last_ckpt >= 60 * minutes)
        done = state.cur_nimg >= total_nimg
        due_ckpt = done or stop or time_due or _crossed(prev_nimg, state.cur_nimg, cfg.train.checkpoint_kimg)
        due_metrics = bool(cfg.metrics.metrics) and not stop and (
            done or _crossed(prev_nimg, state.cur_nimg, cfg.metrics.interval_kimg))
        if (done or _crossed(prev_nimg, state.cur_nimg, cfg.train.sample_kimg)) and not stop:
            logger.write_samples(rt.G_ema, state.step)
        if not (due_ckpt or due_metrics or state.step % cfg.train.log_every_steps == 0):
            continue
        _report(cfg, run, window, due_metrics, due_ckpt, stop)
        if due_ckpt:
            last_ckpt = time.monotonic()
        if stop:
            if run.rank == 0:
                print(f"stop requested (SIGTERM): checkpointed at step {state.step}; rerun to resume", flush=True)
            return


def _report(cfg: Config, run: _Run, window: "_Window", due_metrics: bool, due_ckpt: bool, stop: bool) -> None:
    """A log step: the window's means (all-reduced), metrics when due, the log line, then a checkpoint or a
    plain `ray.train.report`."""
    import ray.train

    state = run.state
    metrics = window.reduce(run.loader, cfg.train.batch_size)
    # Divergence fails the run loudly (a sweep records the trial as failed) instead of training on
    # garbage: the means are all-reduced, so every rank raises at the same step.
    bad = sorted(k for k in ("loss_D", "loss_G", "r1") if k in metrics and not math.isfinite(metrics[k]))
    if bad:
        raise FloatingPointError(f"training diverged: non-finite {', '.join(bad)} around step {state.step} "
                                 f"(kimg {state.cur_nimg / 1000:.3f}); lower optim.lr or loss.r1_gamma")
    metrics.update(step=state.step, kimg=state.cur_nimg / 1000, restarts=len(state.resumed_from),
                   world_size=run.world_size)
    if due_metrics:
        metrics.update(_compute_metrics(cfg, run.rt, run.rank, run.world_size))
    run.logger.log(state.step, metrics)
    if due_ckpt:
        state.stopped_by_signal = stop
        save_checkpoint(cfg, run.rt, state, run.loader, run.logger, metrics, run.rank, run.world_size)
    else:
        ray.train.report(metrics)


class _Window:
    """Sums of per-step stats and timings between two log steps (tensors summed on device, one sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.t_data, self.t0, self.cpu0 = 0, 0.0, time.perf_counter(), time.process_time()

    def add(self, stats: dict[str, torch.Tensor], t_data: float) -> None:
        for k, v in stats.items():
            v = v.detach().float().reshape(())
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.t_data += t_data

    def reduce(self, loader, global_batch: int) -> dict[str, float]:
        """Means over the window and over ranks (one all-reduce), rates, and skipped-record totals."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).cpu().tolist() if keys else []  # the one sync
        local = {k: v / self.counts[k] for k, v in zip(keys, values)}
        local["it_per_s"] = self.steps / wall
        local["data_wait_frac"] = self.t_data / wall
        # CPU seconds this worker process used per wall second (all its threads; not DataLoader children):
        # below cpus_per_worker on a CPU run means the worker waited (data, collectives or other processes).
        local["cpu_util"] = (time.process_time() - self.cpu0) / wall
        out = dist_mean(local)
        out.pop("kimg", None)  # the recipe's kimg is per step; the caller sets the exact counter
        out["samples_per_s"] = out["it_per_s"] * global_batch
        counts = loader.stats()
        totals = dist_sum({"skipped_records": counts["skipped_total"], "records_read": counts["records"],
                           "padded_records": counts["padded"], "s3_retries": counts["s3_retries"]})
        out.update(totals)
        self.reset()
        return out


def _compute_metrics(cfg: Config, rt: GANRuntime, rank: int, world_size: int) -> dict[str, float | str]:
    """The configured metrics of G_ema on every rank (work and real clips split over ranks; same dict on all).

    Real-clip features are cached in memory by `compute_metrics` under the dataset key, so only the
    first evaluation of a worker process reads real clips.
    """
    from digan.data import build_clip_loader
    from digan.metrics import compute_metrics

    def real_clips(num_frames: int):
        loader = build_clip_loader(cfg.data, cfg.model.resolution, 8, num_frames, rank, world_size, cfg.train.seed)
        return iter(loader)

    t0 = time.perf_counter()
    values = compute_metrics(rt.G_ema, real_clips, list(cfg.metrics.metrics), cfg.metrics.num_videos,
                             protocol=cfg.metrics.protocol, detector=cfg.metrics.detector, device=rt.device,
                             seed=cfg.train.seed, dataset_key=f"{cfg.data.source}@{cfg.model.resolution}",
                             i3d_weights=cfg.metrics.i3d_weights, inception_weights=cfg.metrics.inception_weights,
                             kvd_subsets=cfg.metrics.kvd_subsets, clip_frames=cfg.data.num_frames,
                             rank=rank, world_size=world_size)
    values = {k: float(v) for k, v in values.items()}
    values["metrics_time_s"] = time.perf_counter() - t0
    # What the numbers mean travels with them: FD depends on the detector, its preprocessing and N.
    values.update(metrics_num_videos=float(cfg.metrics.num_videos), metrics_protocol=cfg.metrics.protocol,
                  metrics_detector=cfg.metrics.detector)
    return values


