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

import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from digan.config import Config, from_dict, to_dict
from digan.distributed import checkpoint as ckpt
from digan.distributed.deepspeed import DeepSpeedUpdater, build_ds_config, initialize_engine
from digan.distributed.utils import (any_rank, barrier, dist_mean, dist_sum, rng_state, seed_everything,
                                     seed_for_rank, set_rng_state)
from digan.malloc import configure_malloc
from digan.storage import atomic_path, atomic_write, publish_file
from digan.training import (EMA, DIGANLoss, DiscriminatorPair, build_ada_tuner, build_adam, d_reg_interval,
                            sample_time_pairs, train_step, tune_ada)

# ----------------------------------------------------------------------------------------------------
# Latents keyed by global sample index.


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and Python versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


class KeyedLatents:
    """z, z_M and t of fake sample i at step s are a function of (seed, s, phase, i), not of the rank.

    Every rank draws the latents of the WHOLE global batch from one CPU generator seeded by
    (seed, step, phase) and keeps its own rows, so a run on 1 worker and a run on 2 workers draw the
    same fake videos for the same global batch (the data-parallel test relies on it; it also makes a
    resumed run on another number of workers draw the same latents). The cost is a draw of
    global_batch x (z_dim + motion_z_dim) numbers per phase, negligible next to a GAN step.
    Phases count the calls within a step (G step's fakes, then D step's fakes: fresh z for each).
    """

    def __init__(self, seed: int, global_batch: int):
        self.seed, self.global_batch = seed, global_batch
        self.step, self.phase = 0, 0
        self.sample_ids = torch.arange(global_batch)

    def begin_step(self, step: int, sample_ids: torch.Tensor) -> None:
        self.step, self.phase, self.sample_ids = step, 0, sample_ids.cpu().long()

    def draw(self, z_dim: int, motion_z_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(_mix(self.seed, self.step, self.phase))
        self.phase += 1
        n, ids = self.global_batch, self.sample_ids
        z = torch.randn(n, z_dim, generator=g)[ids]
        z_M = torch.randn(n, motion_z_dim, generator=g)[ids]
        t = sample_time_pairs(n, generator=g)[ids]
        return z, z_M, t


class KeyedLatentLoss(DIGANLoss):
    """DIGANLoss whose fake samples use `KeyedLatents` instead of the global RNG (augmentation unchanged).

    Overrides only where z, z_M and t come from (`sample_latents`); the rendering is the recipe's.
    """

    def __init__(self, latents: KeyedLatents, **kwargs: Any):
        super().__init__(**kwargs)
        self.latents = latents

    def sample_latents(self, G: torch.nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, z_M, t = self.latents.draw(G.z_dim, G.motion_z_dim)
        if z.shape[0] != batch_size:
            raise RuntimeError(f"keyed latents: {z.shape[0]} sample ids for a batch of {batch_size}")
        return z, z_M, t


# ----------------------------------------------------------------------------------------------------
# The nets, engines, EMA and loss of one rank.


class GANRuntime:
    """Everything one rank needs to take training steps: engines, updaters, EMA, loss, step counters.

    Usable outside the training loop (the data-parallel test builds one and calls `train_step`).
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        from digan.models import build_discriminators, build_generator

        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.batch_per_worker = cfg.train.batch_size // world_size

        # Same seed on every rank: identical initial weights (DeepSpeed also broadcasts rank 0's).
        seed_everything(cfg.train.seed)
        G = build_generator(cfg.model).train()
        D_img, D_mot = build_discriminators(cfg.model)
        D = DiscriminatorPair(D_img, D_mot).train()
        # G_ema stays outside the engines, in fp32, on this rank's device (identical on every rank).
        self.ema = EMA(copy.deepcopy(G).eval().to(device), cfg.train.batch_size, cfg.optim.ema_kimg,
                       cfg.optim.ema_rampup)

        ds_config = build_ds_config(cfg.dist, self.batch_per_worker)
        _skip_shm_comm_build(device)
        g_opt = build_adam(G.parameters(), cfg.optim, cfg.loss.g_reg_interval)
        d_opt = build_adam(D.parameters(), cfg.optim, d_reg_interval(cfg.loss))
        self.g = DeepSpeedUpdater(initialize_engine(G, g_opt, ds_config, device), cfg.optim.grad_clamp)
        self.d = DeepSpeedUpdater(initialize_engine(D, d_opt, ds_config, device), cfg.optim.grad_clamp)

        self.latents = KeyedLatents(cfg.train.seed, cfg.train.batch_size)
        self.loss = KeyedLatentLoss(self.latents, **DIGANLoss.config_kwargs(cfg.loss))
        # Augmentation and xflip draw from this rank's own stream.
        seed_everything(seed_for_rank(cfg.train.seed, rank))
        self.ada = build_ada_tuner(cfg)  # adaptive augmentation's p (loss.ada_target > 0)
        self.step = 0  # iterations done
        self.cur_nimg = 0  # real pairs shown to D, all ranks together

    @property
    def G(self) -> torch.nn.Module:
        return self.g.module

    @property
    def D(self) -> DiscriminatorPair:
        return self.d.module

    @property
    def G_ema(self) -> torch.nn.Module:
        return self.ema.module

    def local_sample_ids(self) -> torch.Tensor:
        """Global indices of this rank's samples: rank r holds [r * B_local, (r + 1) * B_local)."""
        b = self.batch_per_worker
        return torch.arange(self.rank * b, (self.rank + 1) * b)

    def train_step(self, real_pair: torch.Tensor, real_dt: torch.Tensor,
                   sample_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One iteration on this rank's share of the global batch; returns detached stats tensors."""
        if real_pair.shape[0] != self.batch_per_worker:
            raise ValueError(f"batch of {real_pair.shape[0]} on a rank that expects {self.batch_per_worker}")
        self.latents.begin_step(self.step, self.local_sample_ids() if sample_ids is None else sample_ids)
        real_pair = real_pair.to(self.device, torch.float32, non_blocking=True)
        real_dt = real_dt.to(self.device, torch.float32, non_blocking=True)
        stats = train_step(self.G, self.D.img, self.D.mot, self.g, self.d, self.loss, self.ema, real_pair, real_dt,
                           self.step, self.cur_nimg)
        self.step += 1
        self.cur_nimg += self.cfg.train.batch_size
        tune_ada(self.ada, self.loss, stats, self.step, reduce=lambda r: dist_mean({"r_t": r})["r_t"])
        return stats

    def set_ada(self, state: dict[str, float]) -> None:
        self.ada.load_state_dict(state)
        if self.loss.ada is not None:
            self.loss.ada.p = self.ada.p

    # -- checkpoint parts (collective: every rank calls) --------------------------------------------

    def _engines(self, directory: str) -> list[tuple[DeepSpeedUpdater, str]]:
        return [(self.g, os.path.join(directory, ckpt.G_DIR)), (self.d, os.path.join(directory, ckpt.D_DIR))]

    def save_engines(self, directory: str) -> None:
        """DeepSpeed's files of both engines and, under ZeRO-1/2, their whole optimizer state (rank 0 writes it),
        which lets the checkpoint resume on another worker count."""
        for updater, path in self._engines(directory):
            updater.save_checkpoint(path, tag=ckpt.DS_TAG)
            full = updater.full_optimizer_state()  # collective
            if full is not None and self.rank == 0:
                ckpt.atomic_torch_save(full, os.path.join(path, ckpt.FULL_OPTIMIZER_FILE))

    def load_engines(self, directory: str, same_world: bool = True) -> None:
        for updater, path in self._engines(directory):
            if same_world or not self.g.engine.zero_optimization():
                updater.load_checkpoint(path, tag=ckpt.DS_TAG)
            else:  # ZeRO-1/2 on another worker count
                full = ckpt.load_weights_only(os.path.join(path, ckpt.FULL_OPTIMIZER_FILE))
                updater.load_full_optimizer_state(path, ckpt.DS_TAG, full)


def _skip_shm_comm_build(device: torch.device) -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory comm op (about 2 min with g++).

    `deepspeed.comm` builds it when it wraps the process group, but only inference all-reduce uses it;
    training collectives go through torch.distributed (gloo). DeepSpeed caches the compatibility table
    in `deepspeed.ops.__compatible_ops__` and documents that edits to it persist.
    """
    if device.type != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ----------------------------------------------------------------------------------------------------
# Run state that goes into every checkpoint.


class TrainState:
    """Counters of the run (rank 0's `train_state.pt`), with the history that proves step accounting.

    `resumed_from` lists the step of every checkpoint the run restarted from (Ray retries after a worker
    failure, reruns after SIGTERM); `segments` lists [first_step, last_step] of every stretch of steps
    that ended in a checkpoint, so a reader can check that they tile [0, step) without gaps or overlaps.
    """

    def __init__(self) -> None:
        self.step = 0
        self.cur_nimg = 0
        self.resumed_from: list[int] = []
        self.segments: list[list[int]] = []
        self.segment_start = 0
        self.stopped_by_signal = False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "cur_nimg": self.cur_nimg, "kimg": self.cur_nimg / 1000,
                "resumed_from": list(self.resumed_from), "segments": [list(s) for s in self.segments],
                "stopped_by_signal": self.stopped_by_signal}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.cur_nimg = int(state["step"]), int(state["cur_nimg"])
        self.resumed_from = [int(s) for s in state.get("resumed_from", [])]
        self.segments = [[int(a), int(b)] for a, b in state.get("segments", [])]
        self.segment_start = self.step
        self.stopped_by_signal = bool(state.get("stopped_by_signal", False))


# ----------------------------------------------------------------------------------------------------
# Rank-0 outputs: progress line, TensorBoard, stats.jsonl, sample videos.


class RunLogger:
    """Rank 0's run folder outputs. With local storage they go straight into the run folder; with S3
    they are written to a local staging folder and copied to `{run}/` at every checkpoint and at the end.
    """

    def __init__(self, cfg: Config, storage, enabled: bool):
        import pyarrow.fs as pafs

        self.cfg, self.enabled = cfg, enabled
        self.fs, self.run_fs_path = storage.storage_filesystem, storage.experiment_fs_path
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._tb = None
        self._purge_step: int | None = None
        if not enabled:
            return
        if self.is_local:
            self.dir = Path(self.run_fs_path)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            # A fresh staging folder per attempt, seeded with the stored stats.jsonl so that a resumed run
            # appends to it (it holds the lines up to the last checkpoint, like the checkpoint itself).
            self.dir = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-run-{cfg.train.run_name}-"))
            stats = f"{self.run_fs_path}/stats.jsonl"
            if self.fs.get_file_info(stats).type == pafs.FileType.File:
                pafs.copy_files(stats, str(self.dir / "stats.jsonl"), source_filesystem=self.fs)
        (self.dir / "config.yaml").write_text(_yaml(cfg))

    @property
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, TensorBoard drops the events of the steps that were rolled back
            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=self._purge_step)
        return self._tb

    def resume_at(self, step: int) -> None:
        """A resumed run goes on from `step`: drop the log lines of later steps (they were rolled back), so
        stats.jsonl and TensorBoard hold each step once, from the attempt the checkpoints continue."""
        self._purge_step = step + 1
        if not self.enabled or not (self.dir / "stats.jsonl").exists():
            return
        lines = (self.dir / "stats.jsonl").read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            with atomic_write(self.dir / "stats.jsonl", "w") as f:
                f.write("".join(kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.dir / "stats.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **metrics}, sort_keys=True) + "\n")
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):  # strings: jsonl only
                self.tb.add_scalar(k, v, global_step=step)
        self.tb.flush()
        order = ["loss_G", "loss_D", "r1", "D_M_real", "D_M_fake", "D_I_real", "D_I_fake", "ada_p", "signs_real"]
        extra = " ".join(f"{k} {metrics[k]:.4g}" for k in order if k in metrics)
        metric_str = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("fvd", "kvd", "fid",
                                                                                             "proxy_")))
        if metric_str and "metrics_detector" in metrics:
            metric_str += (f" ({metrics['metrics_detector']}, {metrics['metrics_protocol']}, "
                           f"N={int(metrics['metrics_num_videos'])})")
        print(f"step {step:7d} kimg {metrics['kimg']:9.3f} it/s {metrics['it_per_s']:6.2f} "
              f"samples/s {metrics['samples_per_s']:7.1f} data {100 * metrics['data_wait_frac']:4.1f}% "
              f"skipped {int(metrics['skipped_records'])} {extra} {metric_str}".rstrip(), flush=True)

    @torch.no_grad()
    def write_samples(self, G_ema: torch.nn.Module, step: int) -> Path | None:
        """A grid of `train.num_sample_videos` videos (seeds train.seed, train.seed + 1, ...: the videos
        `digan.generate` renders for those seeds) as samples/step-N.mp4 and in TensorBoard."""
        if not self.enabled:
            return None
        from digan.sampling import sample_videos, video_seeds
        from digan.video_io import tensorboard_video, video_grid, write_mp4

        seeds = video_seeds(self.cfg.train.seed, self.cfg.train.num_sample_videos)
        num_frames = self.cfg.data.num_frames
        grid = video_grid(sample_videos(G_ema, seeds, num_frames, clip_frames=num_frames))  # [T, H', W', 3]
        path = self.dir / "samples" / f"{ckpt.checkpoint_name(step)}.mp4"
        with atomic_path(path, keep_suffix=True) as tmp:  # the muxer picks mp4 by the name
            write_mp4(tmp, grid, fps=8)
        tensorboard_video(self.tb, "samples", grid, step, fps=8)  # watch progress in TensorBoard's Images tab
        self.tb.flush()
        return path

    def sync(self) -> None:
        """Copy the staging folder to the run folder on S3 (no-op for local storage)."""
        if not self.enabled or self.is_local:
            return
        import pyarrow.fs as pafs

        if self._tb is not None:
            self._tb.flush()
        pafs.copy_files(str(self.dir), self.run_fs_path, destination_filesystem=self.fs)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled and not self.is_local:
            shutil.rmtree(self.dir, ignore_errors=True)  # everything that counts was synced at the checkpoints


def _yaml(cfg: Config) -> str:
    from digan.config import dump_yaml

    return dump_yaml(cfg)


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
    import ray.train
    import ray.train.torch

    _quiet_report_logs()

    cfg = from_dict(loop_config["config"])
    clean_stale_staging()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.dist.cpus_per_worker)
    configure_malloc(cfg, device)
    storage = ctx.get_storage()
    logger = RunLogger(cfg, storage, enabled=rank == 0)
    rt = GANRuntime(cfg, rank, world_size, device)
    state = TrainState()

    # Data: this rank's shard stream (resampled or exact epochs: every rank runs the same number of steps).
    from digan.data import build_pair_loader

    loader = build_pair_loader(cfg.data, cfg.model.resolution, rt.batch_per_worker, rank, world_size,
                               cfg.train.seed)

    # Resume from Ray's latest registered checkpoint (a retry after a failure, or a rerun of the name).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            _restore(d, rt, state, loader, rank, world_size)
        state.resumed_from.append(state.step)
        logger.resume_at(state.step)
        if rank == 0:
            print(f"resumed from {checkpoint.path} at step {state.step} (kimg {state.cur_nimg / 1000:.3f})",
                  flush=True)
    rt.step, rt.cur_nimg = state.step, state.cur_nimg

    stopper = StopPoller(loop_config.get("stop_flag"), rank)
    total_nimg = int(round(cfg.train.total_kimg * 1000))
    batches = _endless(loader)
    window = _Window()
    last_ckpt = time.monotonic()  # train.checkpoint_minutes counts from here and from every checkpoint
    keys_log = None
    if cfg.train.log_data_keys:
        if not logger.is_local:
            raise ValueError("train.log_data_keys: needs a local train.storage_path")
        os.makedirs(logger.run_fs_path, exist_ok=True)
        keys_log = open(os.path.join(logger.run_fs_path, f"data_keys-rank{rank}.jsonl"), "a", buffering=1)
    try:
        while state.cur_nimg < total_nimg:
            t0 = time.perf_counter()
            real_pair, real_dt = next(batches)
            t_data = time.perf_counter() - t0
            stats = rt.train_step(real_pair, real_dt)
            prev_nimg = state.cur_nimg
            state.step, state.cur_nimg = rt.step, rt.cur_nimg
            if keys_log is not None:  # which clips each step saw, per rank (an audit; local storage only)
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
            due_log = due_ckpt or due_metrics or state.step % cfg.train.log_every_steps == 0
            if (done or _crossed(prev_nimg, state.cur_nimg, cfg.train.sample_kimg)) and not stop:
                logger.write_samples(rt.G_ema, state.step)
            if not due_log:
                continue

            metrics = window.reduce(loader, cfg.train.batch_size)
            # Divergence fails the run loudly (a sweep records the trial as failed) instead of training on
            # garbage: the means are all-reduced, so every rank raises at the same step.
            bad = sorted(k for k in ("loss_D", "loss_G", "r1") if k in metrics and not math.isfinite(metrics[k]))
            if bad:
                raise FloatingPointError(f"training diverged: non-finite {', '.join(bad)} around step {state.step} "
                                         f"(kimg {state.cur_nimg / 1000:.3f}); lower optim.lr or loss.r1_gamma")
            metrics.update(step=state.step, kimg=state.cur_nimg / 1000, restarts=len(state.resumed_from))
            if due_metrics:
                metrics.update(_compute_metrics(cfg, rt, rank, world_size))
            logger.log(state.step, metrics)
            if due_ckpt:
                state.stopped_by_signal = stop
                _save_checkpoint(cfg, rt, state, loader, logger, metrics, rank, world_size)
                last_ckpt = time.monotonic()
            else:
                ray.train.report(metrics)
            if stop:
                if rank == 0:
                    print(f"stop requested (SIGTERM): checkpointed at step {state.step}; rerun to resume", flush=True)
                return
    finally:
        logger.close()
        if keys_log is not None:
            keys_log.close()


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
                           "padded_records": counts["padded"]})
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
                             i3d_weights=cfg.metrics.i3d_weights, clip_frames=cfg.data.num_frames,
                             rank=rank, world_size=world_size)
    values = {k: float(v) for k, v in values.items()}
    values["metrics_time_s"] = time.perf_counter() - t0
    # What the numbers mean travels with them: FD depends on the detector, its preprocessing and N.
    values.update(metrics_num_videos=float(cfg.metrics.num_videos), metrics_protocol=cfg.metrics.protocol,
                  metrics_detector=cfg.metrics.detector)
    return values


_STAGING = "digan-staging-"  # + the writer's PID: local temp folders of checkpoints and S3-bound run outputs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_stale_staging(tmp: str | None = None) -> list[str]:
    """Remove the staging folders that processes which no longer run left behind (a worker killed while it
    wrote a checkpoint, or a lost node's, when it comes back); folders of live processes stay."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(tmp):
        if not (entry.name.startswith(_STAGING) and entry.is_dir(follow_symlinks=False)):
            continue
        pid = entry.name[len(_STAGING):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _save_checkpoint(cfg: Config, rt: GANRuntime, state: TrainState, loader, logger: RunLogger,
                     metrics: dict[str, float], rank: int, world_size: int) -> None:
    """Write this rank's part to a local temp folder, report it to Ray, then (rank 0) publish generator.pt."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from digan.models import save_generator

    name = ckpt.checkpoint_name(state.step)
    staging = tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-{name}-r{rank}-")
    try:
        state.segments.append([state.segment_start, state.step])
        rt.save_engines(staging)  # collective
        ckpt.atomic_torch_save({"loader": loader.state_dict(), "rng": rng_state(), "world_size": world_size,
                                "ada": rt.ada.state_dict()},
                               os.path.join(staging, ckpt.rank_state_file(rank)))
        if rank == 0:
            ckpt.atomic_torch_save({**state.state_dict(), "G_ema": rt.ema.state_dict(), "config": to_dict(cfg),
                                    "ada_p": rt.ada.p},
                                   os.path.join(staging, ckpt.TRAIN_STATE_FILE))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging), checkpoint_dir_name=name)
        # Every rank has finished copying its part once all have passed this barrier.
        barrier()
        if rank == 0:
            # Wait until Ray has registered it as the latest checkpoint (the one a restart resumes from;
            # registration is asynchronous), so that generator.pt never marks a checkpoint newer than it.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            storage = ray.train.get_context().get_storage()
            export = os.path.join(staging, ckpt.GENERATOR_FILE)
            save_generator(export, rt.G_ema, cfg, state.step, state.cur_nimg / 1000)
            publish_file(storage.storage_filesystem, export,
                         f"{storage.experiment_fs_path}/{name}/{ckpt.GENERATOR_FILE}")
            logger.sync()
        state.segment_start = state.step
        barrier()  # nobody races ahead into the next checkpoint while generator.pt is being published
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore(directory: str, rt: GANRuntime, state: TrainState, loader, rank: int, world_size: int) -> None:
    """Load engines (collective), counters + G_ema, and this rank's loader/RNG state when the world matches."""
    train_state = ckpt.load_weights_only(os.path.join(directory, ckpt.TRAIN_STATE_FILE))
    saved_world = ckpt.check_resumable(train_state["config"], rt.cfg.dist.zero_stage, world_size, directory)
    rt.load_engines(directory, same_world=saved_world == world_size)
    state.load_state_dict(train_state)
    rt.ema.load_state_dict(train_state["G_ema"])
    rt.set_ada({"p": float(train_state.get("ada_p", rt.cfg.loss.ada_p))})  # the same p on every rank
    rank_file = os.path.join(directory, ckpt.rank_state_file(rank))
    rank_state = ckpt.load_weights_only(rank_file) if os.path.exists(rank_file) else None
    if rank_state is not None and int(rank_state.get("world_size", -1)) == world_size:
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        if "ada" in rank_state:  # this rank's part of the open ADA interval
            rt.set_ada(rank_state["ada"])
    else:
        # Another world size: per-rank streams cannot be mapped; start fresh ones that differ from
        # the ones used before the checkpoint (keyed by the resume step).
        seed_everything(seed_for_rank(rt.cfg.train.seed * 7919 + state.step, rank))
        if rank == 0:
            print(f"resume with {world_size} workers (checkpoint had another count): fresh data/RNG streams",
                  flush=True)
