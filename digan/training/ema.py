"""Exponential moving average of G's weights (G_ema is what gets sampled and evaluated).

StyleGAN2-ADA's schedule, expressed as a half-life in images:

    half_life = min(ema_kimg * 1000, ema_rampup * cur_nimg)       (ramp-up; no min() when rampup is None)
    beta      = 0.5 ** (batch_size / half_life)
    G_ema     = lerp(G, G_ema, beta)                               (buffers copied, not averaged)

At cur_nimg = 0 the half-life is 0, so beta = 0 and G_ema starts as an exact copy of G.
batch_size is the GLOBAL batch (all workers together), the number of images one step adds to cur_nimg.
"""

from __future__ import annotations

from typing import Any

import torch


class EMA:
    """Owns G_ema and updates it from G after every step. `state_dict` is G_ema's state_dict."""

    def __init__(self, G_ema: torch.nn.Module, batch_size: int, ema_kimg: float | None = None,
                 ema_rampup: float | None = 0.05):
        self.module = G_ema.requires_grad_(False)
        self.batch_size = batch_size  # global batch of pairs per step
        # Official default: ema_kimg = batch * 10 / 32 (20 kimg at batch 64).
        self.ema_kimg = batch_size * 10 / 32 if ema_kimg is None else ema_kimg
        self.ema_rampup = ema_rampup

    def half_life_nimg(self, cur_nimg: int) -> float:
        half_life = self.ema_kimg * 1000
        if self.ema_rampup is not None:
            half_life = min(half_life, cur_nimg * self.ema_rampup)
        return half_life

    def beta(self, cur_nimg: int) -> float:
        """Decay for the update made at cur_nimg images seen (before this step's batch is counted)."""
        return 0.5 ** (self.batch_size / max(self.half_life_nimg(cur_nimg), 1e-8))

    @torch.no_grad()
    def update(self, G: torch.nn.Module, cur_nimg: int) -> float:
        """G_ema <- lerp(G, G_ema, beta); copy buffers. Returns beta."""
        beta = self.beta(cur_nimg)
        for p_ema, p in zip(self.module.parameters(), G.parameters(), strict=True):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), G.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
