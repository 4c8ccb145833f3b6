"""The nets, DeepSpeed engines, EMA and loss of one rank (`GANRuntime`): what a rank needs to take steps."""

from __future__ import annotations

import os

import torch

from digan.config import Config
from digan.distributed import checkpoint as ckpt
from digan.distributed.deepspeed import DeepSpeedUpdater, build_ds_config, initialize_engine
from digan.distributed.utils import batch_slice, dist_mean, seed_everything, seed_for_rank, share_weight
from digan.models import cpu_kernels
from digan.training.recipe import Trainer


class GANRuntime(Trainer):
    """The trainer of one rank: DeepSpeed engines as updaters, fakes from latents keyed by global sample index
    (the same fakes on any number of workers), ADA's r_t averaged over ranks.

    Usable outside the training loop (the data-parallel test builds one and calls `train_step`).
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size = rank, world_size
        # This rank's share of the global batch: global samples [batch_start, batch_start + batch_per_worker).
        self.batch_start, self.batch_per_worker = batch_slice(cfg.train.batch_size, world_size, rank,
                                                              cfg.model.mbstd_group)
        self.weight = share_weight(self.batch_per_worker, cfg.train.batch_size, world_size)
        ds_config = build_ds_config(cfg.dist, self.batch_per_worker)
        _skip_shm_comm_build(device)
        cpu_kernels.enable(device.type == "cpu")  # kernels for CPU speed (same function; see the module)
        # Same seed on every rank: identical initial weights (DeepSpeed also broadcasts rank 0's).
        seed_everything(cfg.train.seed)
        super().__init__(cfg, device, lambda m, opt: DeepSpeedUpdater(initialize_engine(m, opt, ds_config, device),
                                                                      cfg.optim.grad_clamp, self.weight),
                         nets_on_device=False)
        # Augmentation and xflip are keyed by global sample index (`KeyedLatents.rows`); anything else random
        # draws from this rank's own stream.
        seed_everything(seed_for_rank(cfg.train.seed, rank))

    def local_sample_ids(self) -> torch.Tensor:
        """Global indices of this rank's samples (`batch_slice`)."""
        return torch.arange(self.batch_start, self.batch_start + self.batch_per_worker)

    def begin_step(self, real_pair: torch.Tensor, sample_ids: torch.Tensor | None,
                   order: torch.Tensor | None = None) -> None:
        if real_pair.shape[0] != self.batch_per_worker:
            raise ValueError(f"batch of {real_pair.shape[0]} on a rank that expects {self.batch_per_worker}")
        ids = self.local_sample_ids() if sample_ids is None else sample_ids
        self.latents.begin_step(self.step, ids if order is None else ids[order])

    def images_per_step(self, real_pair: torch.Tensor) -> int:
        return self.cfg.train.batch_size

    def mean_over_ranks(self, value: float) -> float:
        """The global batch's mean of a per-rank mean (ranks weighted by their shares)."""
        return dist_mean({"r_t": value * self.weight})["r_t"]

    # -- checkpoint parts (collective: every rank calls) --------------------------------------------

    def _engines(self, directory: str) -> list[tuple[DeepSpeedUpdater, str]]:
        return [(self.g_updater, os.path.join(directory, ckpt.G_DIR)), (self.d_updater, os.path.join(directory, ckpt.D_DIR))]

    def save_engines(self, directory: str) -> None:
        """DeepSpeed's files of both engines and, under ZeRO-1/2, their whole optimizer state (rank 0 writes it),
        which lets the checkpoint resume on another worker count."""
        for updater, path in self._engines(directory):
            updater.save_checkpoint(path, tag=ckpt.DS_TAG)
            full = updater.full_optimizer_state(keep=self.rank == 0)  # collective; only rank 0 keeps a copy
            if full is not None:
                ckpt.atomic_torch_save(full, os.path.join(path, ckpt.FULL_OPTIMIZER_FILE))

    def load_engines(self, directory: str, same_world: bool = True) -> None:
        for updater, path in self._engines(directory):
            if same_world or not updater.engine.zero_optimization():
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
