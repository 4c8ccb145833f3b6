"""Optimiser settings and the `Updater` interface the recipe steps through.

Adam(β1=0, β2=0.99, eps=1e-8) with StyleGAN2's lazy-regularisation rescaling: a net regularised every
k iterations in a step of its own gets lr·r and β^r with r = k / (k + 1), so that over k iterations its
k + 1 steps add up to the same learning-rate budget (k·lr) and the same β decay (β^k) as k plain steps
(G: k=4, lr 0.0025 -> 0.002; D: k=16 -> ≈0.00235).

- G: k = loss.g_reg_interval (4) as in the official code, although its regulariser (path length) is
  off in DIGAN and the official "Greg" step is empty.
- D: k = loss.r1_interval with the separate R1 schedule (official: 17 steps per 16 iterations). With
  the folded schedule D takes exactly one step per iteration, so there is nothing to compensate: r = 1
  (plain lr and betas), which keeps D's per-iteration Adam budget and horizon equal to the official
  (`d_reg_interval`).

An `Updater` owns one net's backward/step. The recipe calls `zero_grad()`, `backward(loss)` once and
`step()` once per phase (D has two phases on separate-R1 iterations), so a DeepSpeed engine
(engine.backward / engine.step) can stand in for `PlainUpdater` without the recipe knowing (the worker
in digan/distributed provides that one).
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch

from digan.config import LossConfig, OptimConfig


def lazy_reg_ratio(reg_interval: int | None) -> float:
    """k / (k + 1) for a regulariser run every k steps; 1 when there is none (k = 0 or None)."""
    return reg_interval / (reg_interval + 1) if reg_interval else 1.0


def d_reg_interval(cfg: LossConfig) -> int:
    """The lazy-reg interval that rescales D's Adam: r1_interval when R1 runs as its own step, else 0."""
    return cfg.r1_interval if cfg.r1_schedule == "separate" else 0


def adam_kwargs(cfg: OptimConfig, reg_interval: int | None) -> dict[str, Any]:
    """Keyword arguments for torch.optim.Adam after the lazy-reg rescaling (StyleGAN2-ADA train.py)."""
    r = lazy_reg_ratio(reg_interval)
    return {"lr": cfg.lr * r, "betas": (float(cfg.beta1 ** r), float(cfg.beta2 ** r)), "eps": cfg.eps}


def build_adam(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, reg_interval: int | None) -> torch.optim.Adam:
    return torch.optim.Adam(params, **adam_kwargs(cfg, reg_interval))


@torch.no_grad()
def sanitize_grads_(params: Iterable[torch.nn.Parameter], grad_clamp: float) -> None:
    """NaN -> 0 and clamp to ±grad_clamp in place (StyleGAN2-ADA's misc.nan_to_num before every step).

    Keeps one bad batch (an inf logit, a 0/0 in R1) from destroying Adam's moment estimates.
    """
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=grad_clamp, neginf=-grad_clamp).clamp_(-grad_clamp, grad_clamp)


class Updater(Protocol):
    """What the recipe needs from whatever updates one net's weights."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """Sanitize the gradients (nan_to_num + clamp), then apply one optimiser step."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PlainUpdater:
    """Single-process PyTorch updater: `loss.backward()` and `optimizer.step()` on one module."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clamp: float = 1e5):
        self.module = module
        self.optimizer = optimizer
        self.grad_clamp = grad_clamp

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        sanitize_grads_(self.module.parameters(), self.grad_clamp)
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """Weights and optimiser state together, like a DeepSpeed engine checkpoint."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
