"""DeepSpeed engines for G and the discriminators, and the `Updater` the recipe steps through.

Rules this file keeps (each measured on the Ray Train + DeepSpeed stack this project pins):
  - `deepspeed.initialize` reuses the process group Ray Train created (gloo on CPU, NCCL on GPU); we
    never call `init_distributed` ourselves.
  - Client `torch.optim.Adam` optimisers (a DS-config "Adam" JIT-compiles for minutes on CPU), with the
    recipe's lazy-reg-rescaled lr/betas.
  - ZeRO stage <= 2 (ZeRO-3 gives wrong numbers with R1's double backward).
  - Batch keys `train_micro_batch_size_per_gpu` + `gradient_accumulation_steps` (no `train_batch_size`,
    so any world size validates), and a deep copy of the config per `initialize` (DeepSpeed mutates it).
  - The engine is used only for `backward` and `step`; every forward goes through `engine.module`.

Gradient sanitising (official: nan_to_num + clamp to +-1e5 before every step). With ZeRO-1/2 the
reduced gradients live in DeepSpeed's partition buffers, and DeepSpeed checks them for inf/NaN before
the client optimiser runs and *skips the whole step* if it finds any. So we sanitise earlier, where all
stages look alike: a tensor hook on every parameter rewrites the gradient as autograd produces it,
i.e. per rank, before the all-reduce. The mean of clamped finite values is finite and within the
clamp, so DeepSpeed never skips a step, and for ordinary gradients (|g| < clamp) the result is
identical to the official post-reduction clamp. The one difference: a NaN on one rank zeroes that
rank's contribution instead of the whole averaged element. With fp16 the hooks are not installed:
DeepSpeed's dynamic loss scaler must see the overflow to lower the scale (it skips that step).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from digan.config import DistConfig


def build_ds_config(cfg: DistConfig, micro_batch_per_worker: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine (G and D use the same one) for this worker's micro-batch."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_per_worker,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        # The official recipe clamps elementwise (hooks below), it never clips the norm.
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        # Each engine gets its own dynamic loss scaler (G and D may skip steps independently).
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      "min_loss_scale": 1}
    return ds


def initialize_engine(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                      device: torch.device | None = None):
    """Wrap `module` + client `optimizer` in a DeepSpeed engine (reusing the existing process group)."""
    import deepspeed

    if device is not None and device.type == "cuda":
        # DeepSpeed picks its GPU from LOCAL_RANK; pin it to the device Ray assigned so they agree.
        torch.cuda.set_device(device)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=copy.deepcopy(ds_config))
    if device is not None and engine.device != device:
        raise RuntimeError(f"DeepSpeed chose {engine.device} but Ray assigned {device} to this worker")
    return engine


def _link_optimizer_state(zero) -> None:
    """Point every parameter's fragment mapping at Adam's current state (DeepSpeed does it lazily, after the
    first step that follows engine creation or a checkpoint load)."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


class DeepSpeedUpdater:
    """The recipe's `Updater` on a DeepSpeed engine: one `engine.backward` and one `engine.step` per phase.

    The D engine takes two phases on separate-R1 iterations (D step, R1 step), so its own step counter
    (`engine.global_steps`) runs ahead of the iteration count (17 per 16 iterations at r1_interval 16);
    the run's step accounting counts iterations (`GANRuntime.step`), never engine steps.

    Gradients are sanitised by hooks installed here (see the module docstring); `step()` then only
    calls `engine.step()`, which reduces (ZeRO-0/1) or finalises (ZeRO-2) the gradients, runs Adam and
    zeroes the gradients.
    """

    def __init__(self, engine, grad_clamp: float = 1e5, loss_weight: float = 1.0):
        self.engine = engine
        self.grad_clamp = grad_clamp
        self.loss_weight = loss_weight  # a rank's share of an unevenly split global batch (utils.share_weight)
        self._hooks = []
        if not engine.fp16_enabled():
            for p in engine.module.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_hook(self._sanitize))

    def _sanitize(self, grad: torch.Tensor) -> torch.Tensor:
        c = self.grad_clamp
        return torch.nan_to_num(grad, nan=0.0, posinf=c, neginf=-c).clamp_(-c, c)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def zero_grad(self) -> None:
        # engine.step() already leaves the gradients zeroed; this clears anything a caller left behind.
        # ZeRO and bf16/fp16 keep gradients in their own buffers, which their optimizer wrapper clears.
        if self.engine.zero_optimization() or self.engine.bfloat16_enabled() or self.engine.fp16_enabled():
            self.engine.optimizer.zero_grad()
        else:
            self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss if self.loss_weight == 1.0 else loss * self.loss_weight)

    def step(self) -> None:
        self.engine.step()

    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last step (fp16 overflow)."""
        return bool(self.engine.was_step_applied())

    # Checkpointing is collective: EVERY rank must call these, each engine into its own directory
    # (DeepSpeed's file names would collide otherwise).
    def save_checkpoint(self, directory: str, tag: str = "state") -> None:
        self.engine.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str = "state") -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} in {directory}")

    # ZeRO-1/2 split the fp32 master weights and Adam's moments over the ranks, and DeepSpeed refuses to load
    # its files on another number of ranks. So checkpoints also carry the whole optimizer state, gathered
    # with DeepSpeed's tensor-fragment API (`full_optimizer_state`), and a run on another worker count loads
    # the module weights from DeepSpeed's files and everything else from it (`load_full_optimizer_state`).
    ADAM_KEYS = ("exp_avg", "exp_avg_sq")

    def full_optimizer_state(self, keep: bool = True) -> dict[str, Any] | None:
        """Every parameter's fp32 master value and Adam moments, whole, and Adam's step count (collective: call
        on every rank). Ranks that pass `keep=False` take part in the gathers but keep no host copy and get
        None, as without ZeRO (DeepSpeed's files hold it all then)."""
        if not self.engine.zero_optimization():
            return None
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zero = self.engine.optimizer
        base = zero.optimizer
        steps = {float(st["step"]) for st in base.state.values() if "step" in st}
        if len(steps) != 1:
            raise RuntimeError(f"Adam's step counts differ across parameter groups: {sorted(steps)}")
        _link_optimizer_state(zero)
        params = {}
        for name, p in self.engine.module.named_parameters():
            gathered = {"param": safe_get_full_fp32_param(p)}  # each call is a collective
            for key in self.ADAM_KEYS:
                gathered[key] = safe_get_full_optimizer_state(p, key)
            if keep:
                params[name] = {k: v.detach().cpu() for k, v in gathered.items()}
        return {"params": params, "step": steps.pop()} if keep else None

    def load_full_optimizer_state(self, directory: str, tag: str, full: dict[str, Any]) -> None:
        """Resume on another number of ranks: module weights from DeepSpeed's files, this rank's part of the
        fp32 master weights and Adam's moments from `full` (see `full_optimizer_state`)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        path, _ = self.engine.load_checkpoint(directory, tag=tag, load_module_only=True, load_optimizer_states=False,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} in {directory}")
        zero = self.engine.optimizer
        base = zero.optimizer
        # Adam creates its state at its first step; make it now (same layout: this rank's flat partitions) so
        # that DeepSpeed can map every parameter's fragment onto it, then fill it.
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {"step": torch.tensor(float(full["step"])), "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
        _link_optimizer_state(zero)
        names = dict(self.engine.module.named_parameters())
        if set(names) != set(full["params"]):
            raise RuntimeError("the checkpoint's optimizer state is for another model")
        for name, p in names.items():
            saved = full["params"][name]
            safe_set_full_fp32_param(p, saved["param"].to(p.device))
            for key in self.ADAM_KEYS:
                safe_set_full_optimizer_state(p, saved[key].to(p.device), key)
