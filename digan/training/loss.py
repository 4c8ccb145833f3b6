"""DIGAN's loss: non-saturating logistic GAN loss on two discriminators, lazy R1.

Paper §3 / official `loss.py` (OurStyleGAN2Loss):

    L_G = E softplus(-D_M(aug(fake_pair), Δt)) + E softplus(-D_I(aug(fake_frames)))
    L_D = E[softplus(D_M(fake)) + softplus(-D_M(real))] + E[softplus(D_I(fake)) + softplus(-D_I(real))]
    L_R1 = r1_interval * gamma/2 * (E ||∇_x D_M(x)||² + E ||∇_y D_I(y)||²)       (on lazy R1 iterations only)

with x the UN-augmented 7-channel real input of D_M (Δt plane included; the gradient flows back through
the augmentation) and y the AUGMENTED real frames that D_I sees, exactly as the official code does.
Both discriminators see the same augmented pair: D_M the pair stacked with the Δt plane, D_I its two
frames as separate images.

The nets are arguments (EDM style): the loss owns no modules, runs every forward through the modules it
is given (under DeepSpeed these are `engine.module`, see `recipe.py`) and never calls `.backward()`.

Lazy R1 has two schedules (`loss.r1_schedule`):
  - "separate" (default, official phase "Dreg"): on R1 iterations the penalty is its own loss
    (`r1_loss`) with its own real forward and augmentation draw, and D takes its own optimizer step on
    it, so D takes 17 steps per 16 iterations and the x16 R1 gradient does not share Adam's
    normalisation with the adversarial one;
  - "folded": the penalty is added to that iteration's adversarial D loss (`d_loss(..., do_r1=True)`),
    one forward of the reals and one D step per iteration.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from digan.config import R1_SCHEDULES, LossConfig
from digan.training.augment import AdaptiveAugment, DiffAugment, random_xflip

Stats = dict[str, torch.Tensor]


def sample_time_pairs(batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Training timestamps t [B, 2] in [0, 1], t[:, 0] <= t[:, 1] (official `run_G`).

    u1 ~ Beta(2, 1) and u2 ~ Beta(1, 2), then sorted; mean Δt ≈ 0.40. Drawn by inverting the CDFs
    (Beta(2,1): sqrt(U); Beta(1,2): 1 - sqrt(U)) so a seeded `generator` makes them reproducible.
    With a generator the draw happens on the generator's device and is moved to `device`.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch, 2, generator=generator, device=gen_device)
    u1 = u[:, 0].sqrt()  # Beta(2, 1)
    u2 = 1 - u[:, 1].sqrt()  # Beta(1, 2)
    t = torch.stack([torch.minimum(u1, u2), torch.maximum(u1, u2)], dim=1)
    return t.to(device) if device is not None else t


def motion_input(pair: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """D_M's input [N, 7, H, W] = cat(frame_early, frame_late, Δt as a constant plane).

    Same layout as `digan.models.motion_input` (a test checks they agree); kept here so the loss can make
    the 7-channel tensor the R1 leaf and split it again around the augmentation.
    """
    n, _, _, h, w = pair.shape
    dt_plane = dt.to(pair.dtype).view(n, 1, 1, 1).expand(n, 1, h, w)
    return torch.cat([pair.flatten(1, 2), dt_plane], dim=1)


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter (fp32 unless an engine converted it to bf16/fp16)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _fp32_up(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for losses and norms; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _grad_sq_norm(g: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm of a gradient, computed in at least fp32."""
    return _fp32_up(g).square().flatten(1).sum(1)


class DIGANLoss:
    """Losses for G's step (`g_loss`), D's step (`d_loss`) and D's R1 step (`r1_loss`).

    Every call that renders fakes draws fresh z, z_M and t (`sample_latents`: from `latents` when given,
    e.g. keyed by global sample index, else the global RNG), and every D forward draws its own augmentation.
    """

    def __init__(self, r1_gamma: float = 1.0, r1_interval: int = 16, diffaug_policy: str = "color,translation",
                 translation_ratio: float = 0.125, xflip: bool = True,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, r1_schedule: str = "separate",
                 ada: bool = False, ada_p: float = 0.0, latents=None):
        if r1_schedule not in R1_SCHEDULES:
            raise ValueError(f"r1_schedule={r1_schedule!r}: choose {' or '.join(R1_SCHEDULES)}")
        self.r1_gamma = r1_gamma  # R1 weight: the penalty is gamma/2 * ||grad||^2
        self.r1_interval = r1_interval  # lazy R1 every this many iterations (and scaled by it); 0 = never
        self.r1_schedule = r1_schedule  # "separate" (own D step, official) or "folded" (into D's step)
        # pair [N,2,3,H,W] -> pair; DiffAugment unless a caller injects its own (tests fix the randomness).
        self.augment = augment if augment is not None else DiffAugment(diffaug_policy, translation_ratio)
        self.xflip = xflip
        # Adaptive augmentation (loss.ada_target > 0, or a fixed loss.ada_p): geometric ops at probability
        # `self.ada.p` in front of DiffAugment; the trainer's `AdaTuner` moves p. None = off (official).
        self.ada = AdaptiveAugment(ada_p) if ada or ada_p > 0 else None
        # Where fakes' z, z_M and t come from: None = the global RNG; a `KeyedLatents` (digan.training.latents)
        # = keyed by global sample index, the same fakes on any number of workers.
        self.latents = latents

    @staticmethod
    def config_kwargs(cfg: LossConfig) -> dict:
        """Constructor arguments from a `LossConfig` (also for subclasses such as the worker's)."""
        return {"r1_gamma": cfg.r1_gamma, "r1_interval": cfg.r1_interval, "diffaug_policy": cfg.diffaug_policy,
                "translation_ratio": cfg.translation_ratio, "xflip": cfg.xflip, "r1_schedule": cfg.r1_schedule,
                "ada": cfg.ada_target > 0, "ada_p": cfg.ada_p}

    @classmethod
    def from_config(cls, cfg: LossConfig, latents=None) -> "DIGANLoss":
        return cls(**cls.config_kwargs(cfg), latents=latents)

    def r1_due(self, step: int) -> bool:
        """Lazy R1 on iterations 0, k, 2k, ... (StyleGAN2-ADA: `batch_idx % interval == 0`)."""
        return self.r1_interval > 0 and self.r1_gamma > 0 and step % self.r1_interval == 0

    @property
    def separate_r1(self) -> bool:
        return self.r1_schedule == "separate"

    # ------------------------------------------------------------------------------------------------

    def flip_reals(self, real_pair: torch.Tensor) -> torch.Tensor:
        """The real batch as D sees it this iteration: xflip (when on) drawn once, like the official
        dataset's mirror, so D's main step and its R1 step see the same reals."""
        return random_xflip(real_pair, rows=self._rows()) if self.xflip else real_pair

    def _rows(self):
        """Augmentation draws keyed by global sample index when the latents are (`KeyedLatents.rows`), else
        None: the global RNG."""
        return self.latents.rows() if self.latents is not None else None

    def sample_latents(self, G: torch.nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh z [B, z_dim], z_M [B, motion_z_dim] and sorted Beta times t [B, 2]: from `self.latents` when
        set (on the CPU), else from the global RNG (on G's device)."""
        if self.latents is not None:
            z, z_M, t = self.latents.draw(G.z_dim, G.motion_z_dim)
            if z.shape[0] != batch_size:
                raise RuntimeError(f"keyed latents: {z.shape[0]} sample ids for a batch of {batch_size}")
            return z, z_M, t
        device, dtype = _device_of(G), _dtype_of(G)
        z = torch.randn(batch_size, G.z_dim, device=device, dtype=dtype)
        z_M = torch.randn(batch_size, G.motion_z_dim, device=device, dtype=dtype)
        t = sample_time_pairs(batch_size, device=device)
        return z, z_M, t

    def generate_pairs(self, G: torch.nn.Module, batch_size: int, labels: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Render 2 frames per video at `sample_latents`' times: (pair [B,2,3,H,W], Δt [B]); `labels` [B]: the
        fakes' classes (a conditional G; the caller passes the step's real labels: the data's class mix)."""
        z, z_M, t = self.sample_latents(G, batch_size)
        if z.shape[0] != batch_size:
            raise RuntimeError(f"latents for {z.shape[0]} samples, batch of {batch_size}")
        p = next(G.parameters())
        cond = {} if labels is None else {"c": labels.to(p.device)}
        pair = G(z.to(p.device, p.dtype), z_M.to(p.device, p.dtype), t.to(p.device, p.dtype), **cond)
        return pair, (t[:, 1] - t[:, 0]).to(p.device)

    def run_D(self, D_img: torch.nn.Module, D_mot: torch.nn.Module, x: torch.Tensor,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment a 7-channel motion input once and score it: (logits_M [N], logits_I [2N], frames_aug).

        frames_aug [2N, 3, H, W] is the exact tensor D_I saw (R1 of D_I is taken w.r.t. it). `labels` [N]
        (conditional Ds): both frames of a pair carry its label, as in the official `OurDiscriminator`.
        """
        dtype = _dtype_of(D_mot)
        pair = x[:, :6].unflatten(1, (2, 3))
        if self.ada is not None:
            pair = self.ada(pair, rows=self._rows())
        pair = self.augment(pair, rows=self._rows())
        x_aug = torch.cat([pair.flatten(1, 2), x[:, 6:]], dim=1)  # the Δt plane is not augmented
        frames_aug = pair.flatten(0, 1).to(_dtype_of(D_img))
        if labels is None:
            logits_M = _fp32_up(D_mot(x_aug.to(dtype))).flatten()
            logits_I = _fp32_up(D_img(frames_aug)).flatten()
        else:
            labels = labels.to(x.device)
            logits_M = _fp32_up(D_mot(x_aug.to(dtype), labels)).flatten()
            logits_I = _fp32_up(D_img(frames_aug, labels.repeat_interleave(2, dim=0))).flatten()
        return logits_M, logits_I, frames_aug

    def _r1(self, real_M: torch.Tensor, real_I: torch.Tensor, x_real: torch.Tensor,
            frames_aug: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """gamma/2 (E|∇_x D_M|² + E|∇_y D_I|²) on a real forward whose input x_real requires grad."""
        # Two separate grads: D_I's logits also depend on x_real (through the augmentation), so one
        # joint call would mix D_I's gradient into D_M's penalty.
        (g_M,) = torch.autograd.grad(real_M.sum(), x_real, create_graph=True)
        (g_I,) = torch.autograd.grad(real_I.sum(), frames_aug, create_graph=True)
        r1_M, r1_I = _grad_sq_norm(g_M).mean(), _grad_sq_norm(g_I).mean()
        r1 = (self.r1_gamma / 2) * (r1_M + r1_I)
        return r1, {"r1": r1.detach(), "r1_penalty_M": r1_M.detach(), "r1_penalty_I": r1_I.detach()}

    def d_loss(self, G: torch.nn.Module, D_img: torch.nn.Module, D_mot: torch.nn.Module, real_pair: torch.Tensor,
               real_dt: torch.Tensor, do_r1: bool = False, labels: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Stats]:
        """D's adversarial loss for one step (both discriminators); with `do_r1` the folded schedule's
        interval-scaled R1 on the same real forward is added.

        real_pair [B, 2, 3, H, W] in [-1, 1] (earlier frame first, already flipped: `flip_reals`),
        real_dt [B] = index gap / (N - 1). G is only run forward, without building a graph: D's step
        must not touch G's gradients. Stats: loss_D is the adversarial part; with R1, r1 = gamma/2
        (|∇_M|² + |∇_I|²) before the interval scaling, r1_penalty_{M,I} the raw mean squared norms.
        `labels` [B] (conditional): the reals' classes, also the fakes' (`generate_pairs`).
        """
        batch_size = real_pair.shape[0]
        with torch.no_grad():
            fake_pair, fake_dt = self.generate_pairs(G, batch_size, labels)
        fake_M, fake_I, _ = self.run_D(D_img, D_mot, motion_input(fake_pair, fake_dt), labels)

        x_real = motion_input(real_pair, real_dt).detach().requires_grad_(do_r1)
        real_M, real_I, frames_aug = self.run_D(D_img, D_mot, x_real, labels)

        loss_M = F.softplus(fake_M).mean() + F.softplus(-real_M).mean()
        loss_I = F.softplus(fake_I).mean() + F.softplus(-real_I).mean()
        loss = loss_M + loss_I
        stats: Stats = {"loss_D": loss.detach(), "loss_D_M": loss_M.detach(), "loss_D_I": loss_I.detach(),
                        "D_M_real": real_M.detach().mean(), "D_M_fake": fake_M.detach().mean(),
                        "D_I_real": real_I.detach().mean(), "D_I_fake": fake_I.detach().mean()}
        if self.ada is not None:  # ADA's overfitting signal r_t, the mean of both discriminators' sign means
            stats["signs_real"] = (real_M.detach().sign().mean() + real_I.detach().sign().mean()) / 2
            stats["ada_p"] = torch.tensor(self.ada.p)
        if do_r1:
            r1, r1_stats = self._r1(real_M, real_I, x_real, frames_aug)
            loss = loss + r1 * self.r1_interval  # lazy regularisation: scaled by how rarely it runs
            stats |= r1_stats
        return loss, stats

    def r1_loss(self, D_img: torch.nn.Module, D_mot: torch.nn.Module, real_pair: torch.Tensor,
                real_dt: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
        """The separate schedule's R1 loss (official phase "Dreg"): r1_interval * gamma/2 (...).

        Its own forward of the reals (same batch as D's main step) with its own augmentation draw; the
        logits enter only through the penalty's gradients, plus `logits * 0` as in the official loss,
        which gives every D parameter a gradient in this step, zero for those the penalty does not
        depend on (the output biases): Adam then steps them too (moments decay, step count advances),
        exactly as the official optimizer does. Stats as for `d_loss` with R1.
        """
        x_real = motion_input(real_pair, real_dt).detach().requires_grad_(True)
        real_M, real_I, frames_aug = self.run_D(D_img, D_mot, x_real, labels)
        r1, stats = self._r1(real_M, real_I, x_real, frames_aug)
        zero = (real_M * 0).mean() + (real_I * 0).mean()
        return (zero + r1) * self.r1_interval, stats

    def g_loss(self, G: torch.nn.Module, D_img: torch.nn.Module, D_mot: torch.nn.Module,
               batch_size: int, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
        """G's non-saturating loss on a fresh batch (of classes `labels`, conditional). The caller freezes D
        (see `recipe.g_step`)."""
        fake_pair, fake_dt = self.generate_pairs(G, batch_size, labels)
        fake_M, fake_I, _ = self.run_D(D_img, D_mot, motion_input(fake_pair, fake_dt), labels)
        loss_M = F.softplus(-fake_M).mean()
        loss_I = F.softplus(-fake_I).mean()
        loss = loss_M + loss_I
        return loss, {"loss_G": loss.detach(), "loss_G_M": loss_M.detach(), "loss_G_I": loss_I.detach()}
