"""Augmentation in front of both discriminators: DiffAugment on frame pairs, xflip of real clips.

DIGAN (official `diffaugment.py`, policy "color,translation") augments a pair of frames with ONE set
of random parameters, so the motion discriminator never sees two frames that disagree in colour or
position just because of augmentation. The Δt plane of D_M's input is never augmented; callers pass
only the frames here. Every op is differentiable (also twice, for R1 through the augmentation).

Tensors are pairs `[N, 2, 3, H, W]` (N pairs, frame_early then frame_late). Random draws use the
global RNG of the pair's device unless a `torch.Generator` (on that device) is given, or `Rows`: the draws
of a whole global batch from a CPU generator, of which the pair's rows are kept (the training loss: the
same augmentation of a sample on any number of workers; `digan.training.latents.Rows`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from digan.config import DIFFAUG_POLICIES as POLICIES

if TYPE_CHECKING:
    from digan.training.latents import Rows


def _uniform(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n draws of U(0, 1), shaped to broadcast over [N, 2, C, H, W] (one value per pair)."""
    u = torch.rand(n, dtype=x.dtype, device=x.device, generator=generator)
    return u.view(n, 1, 1, 1, 1)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(low, high, (n,), device=x.device, generator=generator)


# ----------------------------------------------------------------------------------------------------
# The individual ops (official diffaugment.py), vectorised over pairs instead of repeating per frame.
# Each op is split into its draw (`rand_*`, as before) and a deterministic application of given
# parameters (`brightness`, ...), so that `DiffAugment` can replay recorded draws (`DiffAugment.apply`).


def brightness(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x + (u - 0.5) for u in [0, 1), one value per pair [N]."""
    return x + (u.to(x.dtype).view(-1, 1, 1, 1, 1) - 0.5)


def saturation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by 2u."""
    x_mean = x.mean(dim=2, keepdim=True)
    return (x - x_mean) * (u.to(x.dtype).view(-1, 1, 1, 1, 1) * 2) + x_mean


def contrast(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Scale each frame's deviation from its own mean (over C, H, W) by u + 0.5."""
    x_mean = x.mean(dim=(2, 3, 4), keepdim=True)
    return (x - x_mean) * (u.to(x.dtype).view(-1, 1, 1, 1, 1) + 0.5) + x_mean


def _shift_index(size: int, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For out[i] = in[i + shift]: the clamped source index [N, size] and whether it is inside [N, size]."""
    src = torch.arange(size, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)
    inside = (src >= 0) & (src < size)
    return src.clamp(0, size - 1), inside


def translate(x: torch.Tensor, t_x: torch.Tensor, t_y: torch.Tensor) -> torch.Tensor:
    """out[i, j] = in[i + t_x, j + t_y] (integer shifts [N] along H and W), 0 where that falls outside.

    Same convention as the official code; one gather over the flattened H*W grid (cheaper than the
    official meshgrid indexing).
    """
    n, _, _, h, w = x.shape
    src_h, in_h = _shift_index(h, t_x.to(x.device).long())  # [N, H]
    src_w, in_w = _shift_index(w, t_y.to(x.device).long())  # [N, W]
    index = (src_h.unsqueeze(2) * w + src_w.unsqueeze(1)).flatten(1)  # [N, H*W]
    mask = (in_h.unsqueeze(2) & in_w.unsqueeze(1)).to(x.dtype).view(n, 1, 1, h, w)
    flat = x.flatten(3)  # [N, 2, C, H*W]
    out = flat.gather(3, index.view(n, 1, 1, h * w).expand_as(flat)).view_as(x)
    return out * mask


def cutout(x: torch.Tensor, off_h: torch.Tensor, off_w: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a (ratio*H) x (ratio*W) square whose top-left corner is at (off_h, off_w) - size // 2."""
    n, _, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    off_h = off_h.to(x.device).long() - size_h // 2
    off_w = off_w.to(x.device).long() - size_w // 2
    rows = torch.arange(h, device=x.device).unsqueeze(0) - off_h.unsqueeze(1)  # [N, H]
    cols = torch.arange(w, device=x.device).unsqueeze(0) - off_w.unsqueeze(1)
    cut = ((rows >= 0) & (rows < size_h)).unsqueeze(2) & ((cols >= 0) & (cols < size_w)).unsqueeze(1)
    return x * (~cut).to(x.dtype).view(n, 1, 1, h, w)


def _translation_range(size: int, ratio: float) -> int:
    return int(size * ratio + 0.5)


def rand_brightness(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(-0.5, 0.5)."""
    return brightness(x, _uniform(x.shape[0], x, generator))


def rand_saturation(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by U(0, 2)."""
    return saturation(x, _uniform(x.shape[0], x, generator))


def rand_contrast(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each frame's deviation from its own mean (over C, H, W) by U(0.5, 1.5)."""
    return contrast(x, _uniform(x.shape[0], x, generator))


def rand_translation(x: torch.Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer shift of up to +-round(ratio * side) pixels in each axis, zero padding."""
    n, _, _, h, w = x.shape
    shift_h, shift_w = _translation_range(h, ratio), _translation_range(w, ratio)
    t_x = _randint(-shift_h, shift_h + 1, n, x, generator)
    t_y = _randint(-shift_w, shift_w + 1, n, x, generator)
    return translate(x, t_x, t_y)


def rand_cutout(x: torch.Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a (ratio*H) x (ratio*W) square at a random centre (not in DIGAN's shipped policy)."""
    n, _, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    off_h = _randint(0, h + (1 - size_h % 2), n, x, generator)
    off_w = _randint(0, w + (1 - size_w % 2), n, x, generator)
    return cutout(x, off_h, off_w, ratio)


# ----------------------------------------------------------------------------------------------------


class DiffAugment:
    """DiffAugment for frame pairs: the same random parameters for both frames of a pair.

    `policy` is a comma-separated subset of "color,translation,cutout" (official order of application);
    "" disables augmentation (the pair is returned unchanged). A call draws the parameters
    (`sample`, in the official order: brightness, saturation, contrast, translation x then y, cutout)
    and applies them (`apply`); `apply` alone replays parameters drawn elsewhere (e.g. recorded from
    the official code by tests/golden/make_train_golden.py).
    """

    def __init__(self, policy: str = "color,translation", translation_ratio: float = 0.125, cutout_ratio: float = 0.5):
        self.policy = [p for p in policy.split(",") if p]
        bad = [p for p in self.policy if p not in POLICIES]
        if bad:
            raise ValueError(f"DiffAugment: unknown policy {bad[0]!r} (choose from {','.join(POLICIES)})")
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    def sample(self, pair: torch.Tensor, generator: torch.Generator | None = None,
               rows: Rows | None = None) -> dict[str, torch.Tensor]:
        """The random parameters for a batch of pairs [N, 2, C, H, W]: one value (or offset pair) per pair.

        Keys: brightness, saturation, contrast (U(0, 1) draws), translation_x/_y (integer shifts),
        cutout_x/_y (integer centres), for the ops in the policy. With `rows`: drawn for the global batch
        (float32 on the CPU), these rows kept.
        """
        if rows is not None:
            like = torch.empty(1, 1, 1, 1, 1).expand(rows.total, 1, 1, *pair.shape[3:])  # CPU float32, no memory
            whole = self.sample(like, rows.generator)
            return {k: rows.keep(v, pair).to(pair.dtype if v.is_floating_point() else v.dtype)
                    for k, v in whole.items()}
        n, _, _, h, w = pair.shape
        params: dict[str, torch.Tensor] = {}
        for p in self.policy:
            if p == "color":
                for key in ("brightness", "saturation", "contrast"):
                    params[key] = _uniform(n, pair, generator).view(n)
            elif p == "translation":
                sh, sw = _translation_range(h, self.translation_ratio), _translation_range(w, self.translation_ratio)
                params["translation_x"] = _randint(-sh, sh + 1, n, pair, generator)
                params["translation_y"] = _randint(-sw, sw + 1, n, pair, generator)
            elif p == "cutout":
                size_h, size_w = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
                params["cutout_x"] = _randint(0, h + (1 - size_h % 2), n, pair, generator)
                params["cutout_y"] = _randint(0, w + (1 - size_w % 2), n, pair, generator)
        return params

    def apply(self, pair: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply given parameters (see `sample`) in the policy's order."""
        x = pair
        for p in self.policy:
            if p == "color":
                x = contrast(saturation(brightness(x, params["brightness"]), params["saturation"]),
                             params["contrast"])
            elif p == "translation":
                x = translate(x, params["translation_x"], params["translation_y"])
            elif p == "cutout":
                x = cutout(x, params["cutout_x"], params["cutout_y"], self.cutout_ratio)
        return x

    def __call__(self, pair: torch.Tensor, generator: torch.Generator | None = None,
                 rows: Rows | None = None) -> torch.Tensor:
        if pair.ndim != 5 or pair.shape[1] != 2:
            raise ValueError(f"DiffAugment expects pairs [N, 2, C, H, W], got {list(pair.shape)}")
        if not self.policy:
            return pair
        return self.apply(pair, self.sample(pair, generator, rows))

    def __repr__(self) -> str:
        return f"DiffAugment(policy={','.join(self.policy)!r}, translation_ratio={self.translation_ratio})"


def random_xflip(pair: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None,
                 rows: Rows | None = None) -> torch.Tensor:
    """Mirror each real pair horizontally with probability p, both frames together (official `mirror: 1`)."""
    if rows is not None:
        flip = rows.keep(torch.rand(rows.total, generator=rows.generator) < p, pair)
    else:
        flip = torch.rand(pair.shape[0], device=pair.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1, 1), pair.flip(-1), pair)


# ----------------------------------------------------------------------------------------------------
# Adaptive discriminator augmentation (StyleGAN2-ADA, Karras et al. 2020): not used by the official DIGAN
# runs (its train.py builds an AugmentPipe for `--aug=ada`, but its loss never calls it), here an option
# for small datasets (`loss.ada_target`).


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [N, 2, 2]


class AdaptiveAugment:
    """StyleGAN2-ADA's geometric pipeline ("bg": pixel blitting, then general geometric) on frame pairs.

    Each op is applied to a pair with probability `p` (the two rotations with 1 - sqrt(1 - p) each, as in
    ADA), with one set of parameters for both frames: xflip, rotation by a multiple of 90 degrees, integer
    translation (up to 0.125 of the side), isotropic scaling (lognormal, std 0.2 octaves), arbitrary
    rotation, anisotropic scaling (std 0.2 octaves), fractional translation (normal, std 0.125 of the side).
    The ops compose into one affine map per pair, applied with one bilinear `grid_sample` and reflection
    padding (ADA filters through a 2x upsampling to reduce aliasing; this does not). Pairs that drew no op
    are returned bit for bit, and p = 0 is the identity. Differentiable twice (R1 through it). Colour stays
    with DiffAugment, which runs after it at p = 1.
    """

    def __init__(self, p: float = 0.0, translate_std: float = 0.125, scale_std: float = 0.2,
                 aniso_std: float = 0.2, xfrac_std: float = 0.125):
        self.p = float(p)
        self.translate_std, self.scale_std, self.aniso_std, self.xfrac_std = translate_std, scale_std, aniso_std, xfrac_std

    def matrices(self, n: int, size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling maps [N, 2, 3] (output -> input, normalised coordinates) and which pairs changed [N].

        A fixed number of draws whatever p is, so the random stream does not depend on p.
        """
        def u(*shape):
            return torch.rand(n, *shape, device=device, generator=generator)

        def gauss(*shape):
            return torch.randn(n, *shape, device=device, generator=generator)

        p, p_rot = self.p, 1 - math.sqrt(max(1 - self.p, 0.0))
        eye = torch.eye(2, device=device).expand(n, 2, 2)
        A, shift, changed = eye.clone(), torch.zeros(n, 2, device=device), torch.zeros(n, dtype=torch.bool, device=device)

        def apply(M, on, t=None):  # A <- A @ M (and the shift) where `on`
            nonlocal A, shift, changed
            A = torch.where(on.view(n, 1, 1), A @ M, A)
            if t is not None:
                shift = torch.where(on.view(n, 1), shift + (A @ t.unsqueeze(-1)).squeeze(-1), shift)
            changed = changed | on

        on, bit = u() < p, (u() < 0.5).float()  # xflip
        apply(torch.diag_embed(torch.stack([1 - 2 * bit, torch.ones_like(bit)], -1)), on)
        on, k = u() < p, torch.floor(u() * 4)  # rotate by k * 90 degrees
        apply(_rotation(k * (math.pi / 2)), on)
        on, t = u() < p, (u(2) * 2 - 1) * self.translate_std  # integer translation (whole pixels)
        apply(eye, on, torch.round(t * size) * 2 / size)
        on, s = u() < p, torch.exp2(gauss() * self.scale_std)  # isotropic scaling
        apply(torch.diag_embed(torch.stack([s, s], -1)), on)
        on, r = u() < p_rot, (u() * 2 - 1) * math.pi  # rotation (before the anisotropic scaling)
        apply(_rotation(r), on)
        on, s = u() < p, torch.exp2(gauss() * self.aniso_std)  # anisotropic scaling
        apply(torch.diag_embed(torch.stack([s, 1 / s], -1)), on)
        on, r = u() < p_rot, (u() * 2 - 1) * math.pi  # rotation (after)
        apply(_rotation(r), on)
        on, t = u() < p, gauss(2) * self.xfrac_std  # fractional translation
        apply(eye, on, t * 2)
        return torch.cat([A, shift.unsqueeze(-1)], dim=-1), changed

    def __call__(self, pair: torch.Tensor, generator: torch.Generator | None = None,
                 rows: Rows | None = None) -> torch.Tensor:
        if pair.ndim != 5 or pair.shape[1] != 2:
            raise ValueError(f"AdaptiveAugment expects pairs [N, 2, C, H, W], got {list(pair.shape)}")
        if self.p <= 0:
            return pair
        n, _, c, h, w = pair.shape
        if rows is not None:
            theta, changed = (rows.keep(t, pair) for t in self.matrices(rows.total, w, rows.generator))
        else:
            theta, changed = self.matrices(n, w, generator, pair.device)
        x = pair.flatten(1, 2)  # [N, 2C, H, W]: both frames through one map
        grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        y = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return torch.where(changed.view(n, 1, 1, 1), y, x).view(n, 2, c, h, w)

    def __repr__(self) -> str:
        return f"AdaptiveAugment(p={self.p:.4f})"


class AdaTuner:
    """ADA's heuristic: every `interval` steps move p by sign(r_t - target) * (batch * interval) / (kimg * 1000),

    r_t = E[sign(D(real))] over those steps (the caller averages it over ranks), p kept in [0, 1]. Here r_t is
    the mean of the two discriminators' sign means (D_M's and D_I's, each on its augmented reals).
    """

    def __init__(self, target: float, kimg: float, interval: int, batch_size: int, p: float = 0.0,
                 augment: "AdaptiveAugment | None" = None):
        self.target, self.kimg, self.interval, self.batch_size = target, kimg, interval, batch_size
        self.augment = augment  # the pipeline whose p this tunes: p lives there, once (None: kept here)
        self.p = float(p)
        self.sum, self.count = 0.0, 0

    @property
    def p(self) -> float:
        return self.augment.p if self.augment is not None else self._p

    @p.setter
    def p(self, value: float) -> None:
        if self.augment is not None:
            self.augment.p = float(value)
        else:
            self._p = float(value)

    def observe(self, sign_mean: torch.Tensor | float) -> None:
        """Add one iteration's r_t (a tensor stays on its device: no sync until `local_mean`)."""
        self.sum = self.sum + sign_mean
        self.count += 1

    def due(self, step: int) -> bool:
        """After iteration `step` (counted from 1) when it closes an interval."""
        return self.target > 0 and step % self.interval == 0

    def local_mean(self) -> float:
        return float(self.sum) / max(self.count, 1)

    def adjust(self, r_t: float) -> float:
        """Step p with the (rank-averaged) r_t of the interval and start the next one; returns the new p."""
        adjust = math.copysign(1.0, r_t - self.target) if r_t != self.target else 0.0
        self.p = min(max(self.p + adjust * self.batch_size * self.interval / (self.kimg * 1000), 0.0), 1.0)
        self.sum, self.count = 0.0, 0
        return self.p

    def state_dict(self) -> dict[str, float]:
        return {"p": self.p, "sum": float(self.sum), "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.p, self.sum, self.count = float(state["p"]), float(state.get("sum", 0.0)), int(state.get("count", 0))
