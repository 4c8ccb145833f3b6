"""The run's state across checkpoints: counters (`TrainState`), writing a checkpoint of every rank through Ray
(`save_checkpoint`) and restoring one (`restore`)."""

from __future__ import annotations

import os
import shutil
from typing import Any

from digan.config import Config, to_dict
from digan.distributed import checkpoint as ckpt
from digan.distributed.run_logger import RunLogger
from digan.distributed.runtime import GANRuntime
from digan.distributed.utils import barrier, rng_state, seed_everything, seed_for_rank, set_rng_state
from digan.storage import publish_file


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


def save_checkpoint(cfg: Config, rt: GANRuntime, state: TrainState, loader, logger: RunLogger,
                     metrics: dict[str, float], rank: int, world_size: int) -> None:
    """Write this rank's part to a local temp folder, report it to Ray, then (rank 0) publish generator.pt."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from digan.models import save_generator

    name = ckpt.checkpoint_name(state.step)
    staging = ckpt.staging_dir(f"{name}-r{rank}")
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


def same_streams(saved: dict, cfg: Config) -> bool:
    """Whether a checkpoint's data streams are this run's: the same largest worker count, batch and data."""
    dist, train = saved.get("dist", {}), saved.get("train", {})
    return (dist.get("num_workers") == cfg.dist.num_workers and train.get("batch_size") == cfg.train.batch_size
            and saved.get("data", {}).get("num_workers") == cfg.data.num_workers)


def restore(directory: str, rt: GANRuntime, state: TrainState, loader, rank: int, world_size: int) -> None:
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
    elif same_streams(train_state["config"], rt.cfg):
        # Another worker count of the same run (elastic): the data streams belong to dist.num_workers, not to the
        # ranks, so every rank's loader was at the same place; take rank 0's. Augmentation is keyed by sample.
        loader.load_state_dict(ckpt.load_weights_only(os.path.join(directory, ckpt.rank_state_file(0)))["loader"])
        seed_everything(seed_for_rank(rt.cfg.train.seed * 7919 + state.step, rank))
    else:
        # Another largest worker count or batch: the streams cannot be mapped; start fresh ones that differ
        # from the ones used before the checkpoint (keyed by the resume step).
        seed_everything(seed_for_rank(rt.cfg.train.seed * 7919 + state.step, rank))
        if rank == 0:
            print(f"resume with {world_size} workers of at most {rt.cfg.dist.num_workers} (the checkpoint had "
                  f"another largest count or batch): fresh data streams", flush=True)
