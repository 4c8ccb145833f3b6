"""One training iteration of DIGAN, framework-free, in the official phase order.

    G step (D frozen)  ->  D step  ->  D's R1 step (separate schedule, R1 iterations)  ->  EMA

(official StyleGAN2-ADA loop: Gmain, Greg (empty in DIGAN: no path-length reg), Dmain, Dreg, G_ema).
Each phase draws its own fresh z, z_M, t and its own augmentation, as the official phases do.

The recipe sees nets and `Updater`s only. Single-process training uses `PlainUpdater`; the distributed
worker passes DeepSpeed-backed updaters and the engines' `.module`s as the nets. Rules this file keeps so
that the same code is correct under DeepSpeed:
  - every forward goes through the modules given here (never through an engine);
  - each phase is `zero_grad`, exactly one `backward`, one `step` on one updater (D's updater takes two
    such phases on separate-R1 iterations: a DeepSpeed engine takes one backward per step, any number
    of backward/step pairs per iteration);
  - D is frozen (requires_grad False) during G's step, so G's loss leaves no gradient in D;
  - `.backward()` is never called on a tensor directly, only `updater.backward(loss)`.

Stats are returned as detached tensors: converting them to Python floats forces a host-device sync, so
do it once, only on logging steps (`stats_to_floats`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch

from digan.config import Config
from digan.training.augment import AdaTuner
from digan.training.ema import EMA
from digan.training.latents import KeyedLatents
from digan.training.loss import DIGANLoss, Stats
from digan.training.optim import PlainUpdater, Updater, build_adam, d_reg_interval


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Set requires_grad False on every parameter inside the block, then restore each flag as it was."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def d_step(G: torch.nn.Module, D_img: torch.nn.Module, D_mot: torch.nn.Module, d_updater: Updater,
           loss: DIGANLoss, real_pair: torch.Tensor, real_dt: torch.Tensor, do_r1: bool = False,
           labels: torch.Tensor | None = None) -> Stats:
    """One adversarial update of both discriminators (official "Dmain"; one backward, one step).

    `do_r1` adds the folded schedule's R1 to this step's loss (the separate schedule uses `r1_step`).
    """
    d_updater.zero_grad()
    loss_D, stats = loss.d_loss(G, D_img, D_mot, real_pair, real_dt, do_r1, labels)
    d_updater.backward(loss_D)
    d_updater.step()
    return stats


def r1_step(D_img: torch.nn.Module, D_mot: torch.nn.Module, d_updater: Updater, loss: DIGANLoss,
            real_pair: torch.Tensor, real_dt: torch.Tensor, labels: torch.Tensor | None = None) -> Stats:
    """The separate schedule's R1 update of both discriminators (official "Dreg"; own backward and step)."""
    d_updater.zero_grad()
    loss_r1, stats = loss.r1_loss(D_img, D_mot, real_pair, real_dt, labels)
    d_updater.backward(loss_r1)
    d_updater.step()
    return stats


def g_step(G: torch.nn.Module, D_img: torch.nn.Module, D_mot: torch.nn.Module, g_updater: Updater,
           loss: DIGANLoss, batch_size: int, labels: torch.Tensor | None = None) -> Stats:
    """One update of G on fresh z, z_M and t (and classes `labels`, conditional); gradients flow through the
    frozen discriminators."""
    g_updater.zero_grad()
    with frozen(D_img, D_mot):
        loss_G, stats = loss.g_loss(G, D_img, D_mot, batch_size, labels)
        g_updater.backward(loss_G)
    g_updater.step()
    return stats


def train_step(G: torch.nn.Module, D_img: torch.nn.Module, D_mot: torch.nn.Module, g_updater: Updater,
               d_updater: Updater, loss: DIGANLoss, ema: EMA, real_pair: torch.Tensor, real_dt: torch.Tensor,
               step: int, cur_nimg: int, labels: torch.Tensor | None = None) -> Stats:
    """One DIGAN iteration: G step, D step, D's R1 step (when `loss.r1_due(step)`), EMA update.

    With `loss.r1_schedule == "folded"` the R1 of an R1 iteration is added to the D step instead.
    real_pair [B_local, 2, 3, H, W] in [-1, 1] and real_dt [B_local] are this worker's share of the batch
    (xflip is drawn here, once, so both D steps see the same reals); G's step uses the same local batch
    size. A conditional model takes the reals' class indices `labels` [B_local]; the fakes of both steps
    take them too (the data's class mix, row by row). `step` counts iterations from 0 (lazy R1 on iterations 0, k, 2k..); `cur_nimg` is the number of
    real pairs seen by all workers BEFORE this iteration (drives the EMA ramp-up, as in the official loop).
    Returns detached tensors: loss_G, loss_D, D_{M,I}_{real,fake} logit means, r1 (R1 iterations only),
    d_steps (D optimizer steps taken), ema_beta and kimg (images seen after this iteration, in thousands).
    """
    real_pair = loss.flip_reals(real_pair)
    stats = g_step(G, D_img, D_mot, g_updater, loss, real_pair.shape[0], labels)
    do_r1 = loss.r1_due(step)
    stats |= d_step(G, D_img, D_mot, d_updater, loss, real_pair, real_dt, do_r1=do_r1 and not loss.separate_r1,
                    labels=labels)
    d_steps = 1
    if do_r1 and loss.separate_r1:
        stats |= r1_step(D_img, D_mot, d_updater, loss, real_pair, real_dt, labels)
        d_steps = 2
    beta = ema.update(G, cur_nimg)
    stats["d_steps"] = torch.tensor(float(d_steps))
    stats["ema_beta"] = torch.tensor(beta)
    stats["kimg"] = torch.tensor((cur_nimg + ema.batch_size) / 1000)
    return stats


def build_ada_tuner(cfg: Config, loss: DIGANLoss | None = None) -> AdaTuner:
    """ADA's tuner for `cfg.loss`; it moves the p of `loss.ada` (the one place p lives) when given."""
    return AdaTuner(cfg.loss.ada_target, cfg.loss.ada_kimg, cfg.loss.ada_interval, cfg.train.batch_size,
                    cfg.loss.ada_p, augment=loss.ada if loss is not None else None)


def tune_ada(tuner: AdaTuner, loss: DIGANLoss, stats: Stats, step: int,
             reduce: Callable[[float], float] = lambda r: r) -> None:
    """ADA after iteration `step` (counted from 1): note this step's r_t; at the end of an interval move p.

    `reduce` averages the interval's r_t over ranks (identity in one process), so every rank sets the same p.
    """
    if tuner.target <= 0 or loss.ada is None:
        return
    tuner.observe(stats["signs_real"])
    if tuner.due(step):
        tuner.adjust(reduce(tuner.local_mean()))


def stats_to_floats(stats: Stats) -> dict[str, float]:
    """Tensors -> floats with ONE device sync (call only on logging steps)."""
    out: dict[str, float] = {}
    on_device = {k: v for k, v in stats.items() if v.device.type != "cpu"}
    for k, v in stats.items():
        if k not in on_device:
            out[k] = float(v.detach().float().reshape(()))  # already on the host: no sync
    if on_device:  # one stack on the device, one copy to the host
        values = torch.stack([v.detach().float().reshape(()) for v in on_device.values()]).tolist()
        out.update(zip(on_device, values))
    return {k: out[k] for k in stats}


# ----------------------------------------------------------------------------------------------------
# Single-process training: the same step, plain PyTorch updaters. Used by tests and small CPU runs.


class DiscriminatorPair(torch.nn.Module):
    """D_I and D_M in one module, so one optimiser (or one DeepSpeed engine) updates both."""

    def __init__(self, D_img: torch.nn.Module, D_mot: torch.nn.Module):
        super().__init__()
        self.img = D_img
        self.mot = D_mot


def group_order(n: int, group: int) -> torch.Tensor | None:
    """The order of a process's n samples (whole contiguous groups of `group` of the global batch, in global
    order) in which D's minibatch-stddev groups (strided: sample i with i + n/group, i + 2n/group, ...) are
    those contiguous groups: sample j of group b goes to row j * (n / group) + b. None when n holds at most
    one group (nothing to reorder) or is not made of whole groups. So the groups, and with them the maths of
    a step, are the same on any number of workers (a rank of 4 and a process of 8 both group 0-3 and 4-7)."""
    if n <= group or n % group:
        return None
    return torch.arange(n).view(n // group, group).t().flatten()


class Trainer:
    """G, D_I + D_M, G_ema, their updaters, the loss and ADA's tuner, and the step counters: what takes training
    steps, in one process (`SingleProcessTrainer`) or as one rank of many (`digan.distributed.runtime.GANRuntime`,
    DeepSpeed-backed updaters and keyed latents). One build, one step, for both.

    `wrap(module, optimizer) -> Updater` makes the updaters; `nets_on_device` moves G and D to `device` first
    (DeepSpeed engines move them themselves). The caller seeds the global RNG before (the initial weights).
    Fakes' latents are keyed by (seed, step, phase, global sample index) (`KeyedLatents`, default seed
    `train.seed`): one process and any number of ranks draw the same fake videos for the same step.
    """

    def __init__(self, cfg: Config, device: torch.device | str, wrap: Callable[[torch.nn.Module, Any], Updater],
                 latents_seed: int | None = None, nets_on_device: bool = True):
        from digan.models import build_discriminators, build_generator  # heavy import, only when training

        self.cfg, self.device = cfg, torch.device(device)
        G = build_generator(cfg.model).train()
        G = G.to(self.device) if nets_on_device else G
        D_img, D_mot = build_discriminators(cfg.model)
        D = DiscriminatorPair(D_img, D_mot).train()
        D = D.to(self.device) if nets_on_device else D
        # G_ema stays outside the updaters, in fp32, on this device (identical on every rank).
        self.ema = EMA(copy.deepcopy(G).eval().to(self.device), cfg.train.batch_size, cfg.optim.ema_kimg,
                       cfg.optim.ema_rampup)
        self.g_updater = wrap(G, build_adam(G.parameters(), cfg.optim, cfg.loss.g_reg_interval))
        self.d_updater = wrap(D, build_adam(D.parameters(), cfg.optim, d_reg_interval(cfg.loss)))
        self.latents = KeyedLatents(cfg.train.seed if latents_seed is None else latents_seed, cfg.train.batch_size)
        self.loss = DIGANLoss.from_config(cfg.loss, self.latents)
        self.ada = build_ada_tuner(cfg, self.loss)  # adaptive augmentation's p (loss.ada_target > 0)
        self.step = 0  # iterations done
        self.cur_nimg = 0  # real pairs shown to D, all ranks together

    @property
    def G(self) -> torch.nn.Module:
        return self.g_updater.module

    @property
    def D(self) -> DiscriminatorPair:
        return self.d_updater.module

    @property
    def G_ema(self) -> torch.nn.Module:
        return self.ema.module

    # Hooks of one step (a rank of many overrides them).
    def begin_step(self, real_pair: torch.Tensor, sample_ids: torch.Tensor | None,
                   order: torch.Tensor | None = None) -> None:
        """Before the step's draws: the global sample indices of this process's rows (here: all of them), in
        the step's `order` (`group_order`)."""
        if sample_ids is None:
            if real_pair.shape[0] != self.cfg.train.batch_size:
                raise ValueError(f"a batch of {real_pair.shape[0]} in one process: train.batch_size is "
                                 f"{self.cfg.train.batch_size}")
            sample_ids = torch.arange(real_pair.shape[0])
        self.latents.begin_step(self.step, sample_ids if order is None else sample_ids[order])

    def images_per_step(self, real_pair: torch.Tensor) -> int:
        """Real pairs this step shows D, all ranks together."""
        return real_pair.shape[0]

    def mean_over_ranks(self, value: float) -> float:
        return value

    def train_step(self, real_pair: torch.Tensor, real_dt: torch.Tensor, sample_ids: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> Stats:
        """One iteration on this process's share of the batch (+ its class labels, conditional); returns
        detached stats tensors."""
        order = group_order(real_pair.shape[0], self.cfg.model.mbstd_group)
        if order is not None:
            real_pair, real_dt = real_pair[order], real_dt[order]
            labels = labels[order] if labels is not None else None
        self.begin_step(real_pair, sample_ids, order)
        real_pair = real_pair.to(self.device, torch.float32, non_blocking=True)
        real_dt = real_dt.to(self.device, torch.float32, non_blocking=True)
        if (labels is None) != (self.cfg.model.num_classes == 0):
            raise ValueError(f"model.num_classes={self.cfg.model.num_classes}: a step "
                             f"{'needs' if labels is None else 'takes no'} class labels")
        if labels is not None:  # once per step, not per forward
            labels = labels.to(self.device, non_blocking=True)
        stats = train_step(self.G, self.D.img, self.D.mot, self.g_updater, self.d_updater, self.loss, self.ema,
                           real_pair, real_dt, self.step, self.cur_nimg, labels)
        self.step += 1
        self.cur_nimg += self.images_per_step(real_pair)
        tune_ada(self.ada, self.loss, stats, self.step, reduce=self.mean_over_ranks)
        return stats

    def set_ada(self, state: dict[str, float]) -> None:
        """ADA's p (and its open interval) from a checkpoint."""
        self.ada.load_state_dict(state)


class SingleProcessTrainer(Trainer):
    """The trainer in one process, with plain PyTorch updaters (no Ray, no DeepSpeed). `seed` seeds the global
    RNG (initial weights, augmentation) and keys the fakes' latents; None leaves the global RNG as it is and
    keys the latents by train.seed."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", seed: int | None = None):
        if seed is not None:
            torch.manual_seed(seed)
        super().__init__(cfg, device, lambda m, opt: PlainUpdater(m, opt, cfg.optim.grad_clamp), latents_seed=seed)

    def state_dict(self) -> dict[str, Any]:
        return {"G": self.g_updater.state_dict(), "D": self.d_updater.state_dict(), "G_ema": self.ema.state_dict(),
                "step": self.step, "cur_nimg": self.cur_nimg, "ada": self.ada.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_updater.load_state_dict(state["G"])
        self.d_updater.load_state_dict(state["D"])
        self.ema.load_state_dict(state["G_ema"])
        self.step, self.cur_nimg = int(state["step"]), int(state["cur_nimg"])
        if "ada" in state:
            self.set_ada(state["ada"])


def fit(cfg: Config, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_steps: int,
        device: torch.device | str = "cpu", seed: int | None = 0,
        log_every: int = 0) -> tuple[SingleProcessTrainer, list[dict[str, float]]]:
    """Train for `num_steps` on an iterator of (pair [B,2,3,H,W] in [-1,1], dt [B]) (+ labels [B], conditional);
    returns trainer and history.

    The history holds every step's stats as floats (one sync per step, fine for small CPU runs);
    `log_every > 0` prints a progress line every that many steps.
    """
    trainer = SingleProcessTrainer(cfg, device, seed)
    history: list[dict[str, float]] = []
    it = iter(batches)
    for _ in range(num_steps):
        real_pair, real_dt, *labels = next(it)
        stats = stats_to_floats(trainer.train_step(real_pair, real_dt, labels=labels[0] if labels else None))
        history.append(stats)
        if log_every and trainer.step % log_every == 0:
            print(f"step {trainer.step:6d} kimg {stats['kimg']:8.3f} loss_G {stats['loss_G']:.4f} "
                  f"loss_D {stats['loss_D']:.4f}" + (f" r1 {stats['r1']:.4g}" if "r1" in stats else ""), flush=True)
    return trainer, history
