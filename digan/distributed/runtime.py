"""The nets, DeepSpeed engines, EMA and loss of one rank (`GANRuntime`): what a rank needs to take steps."""

from __future__ import annotations

import copy
import os

import torch

from digan.config import Config
from digan.distributed import checkpoint as ckpt
from digan.distributed.deepspeed import DeepSpeedUpdater, build_ds_config, initialize_engine
from digan.distributed.utils import dist_mean, seed_everything, seed_for_rank
from digan.models import cpu_kernels
from digan.training import (EMA, DIGANLoss, DiscriminatorPair, build_ada_tuner, build_adam, d_reg_interval, train_step,
                            tune_ada)
from digan.training.latents import KeyedLatentLoss, KeyedLatents


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
        cpu_kernels.enable(device.type == "cpu")  # kernels for CPU speed (same function; see the module)
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
