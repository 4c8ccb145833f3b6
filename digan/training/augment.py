"""Augmentation in front of both discriminators: DiffAugment on frame pairs, xflip of real clips.

DIGAN (official `diffaugment.py`, policy "color,translation") augments a pair of frames with ONE set
of random parameters, so the motion discriminator never sees two frames that disagree in colour or
position just because of augmentation. The Δt plane of D_M's input is never augmented; callers pass
only the frames here. Every op is differentiable (also twice, for R1 through the augmentation).

Tensors are pairs `[N, 2, 3, H, W]` (N pairs, frame_early then frame_late). Random draws use the
global RNG of the pair's device unless a `torch.Generator` (on that device) is given.
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout")


def _uniform(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n draws of U(0, 1), shaped to broadcast over [N, 2, C, H, W] (one value per pair)."""
    u = torch.rand(n, dtype=x.dtype, device=x.device, generator=generator)
    return u.view(n, 1, 1, 1, 1)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(low, high, (n,), device=x.device, generator=generator)


# ----------------------------------------------------------------------------------------------------
# The individual ops (official diffaugment.py), vectorised over pairs instead of repeating per frame.


def rand_brightness(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(-0.5, 0.5)."""
    return x + (_uniform(x.shape[0], x, generator) - 0.5)


def rand_saturation(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by U(0, 2)."""
    x_mean = x.mean(dim=2, keepdim=True)
    return (x - x_mean) * (_uniform(x.shape[0], x, generator) * 2) + x_mean


def rand_contrast(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each frame's deviation from its own mean (over C, H, W) by U(0.5, 1.5)."""
    x_mean = x.mean(dim=(2, 3, 4), keepdim=True)
    return (x - x_mean) * (_uniform(x.shape[0], x, generator) + 0.5) + x_mean


def _shift_index(size: int, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For out[i] = in[i + shift]: the clamped source index [N, size] and whether it is inside [N, size]."""
    src = torch.arange(size, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)
    inside = (src >= 0) & (src < size)
    return src.clamp(0, size - 1), inside


def rand_translation(x: torch.Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer shift of up to +-round(ratio * side) pixels in each axis, zero padding.

    Same convention as the official code: out[i, j] = in[i + t_x, j + t_y], 0 where that falls outside.
    Implemented as one gather over the flattened H*W grid (cheaper than the official meshgrid indexing).
    """
    n, _, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    t_x = _randint(-shift_h, shift_h + 1, n, x, generator)
    t_y = _randint(-shift_w, shift_w + 1, n, x, generator)
    src_h, in_h = _shift_index(h, t_x)  # [N, H]
    src_w, in_w = _shift_index(w, t_y)  # [N, W]
    index = (src_h.unsqueeze(2) * w + src_w.unsqueeze(1)).flatten(1)  # [N, H*W]
    mask = (in_h.unsqueeze(2) & in_w.unsqueeze(1)).to(x.dtype).view(n, 1, 1, h, w)
    flat = x.flatten(3)  # [N, 2, C, H*W]
    out = flat.gather(3, index.view(n, 1, 1, h * w).expand_as(flat)).view_as(x)
    return out * mask


def rand_cutout(x: torch.Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a (ratio*H) x (ratio*W) square at a random centre (not in DIGAN's shipped policy)."""
    n, _, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    off_h = _randint(0, h + (1 - size_h % 2), n, x, generator) - size_h // 2
    off_w = _randint(0, w + (1 - size_w % 2), n, x, generator) - size_w // 2
    rows = torch.arange(h, device=x.device).unsqueeze(0) - off_h.unsqueeze(1)  # [N, H]
    cols = torch.arange(w, device=x.device).unsqueeze(0) - off_w.unsqueeze(1)
    cut = ((rows >= 0) & (rows < size_h)).unsqueeze(2) & ((cols >= 0) & (cols < size_w)).unsqueeze(1)
    return x * (~cut).to(x.dtype).view(n, 1, 1, h, w)


# ----------------------------------------------------------------------------------------------------


class DiffAugment:
    """DiffAugment for frame pairs: the same random parameters for both frames of a pair.

    `policy` is a comma-separated subset of "color,translation,cutout" (official order of application);
    "" disables augmentation (the pair is returned unchanged).
    """

    def __init__(self, policy: str = "color,translation", translation_ratio: float = 0.125, cutout_ratio: float = 0.5):
        self.policy = [p for p in policy.split(",") if p]
        bad = [p for p in self.policy if p not in POLICIES]
        if bad:
            raise ValueError(f"DiffAugment: unknown policy {bad[0]!r} (choose from {','.join(POLICIES)})")
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    def __call__(self, pair: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if pair.ndim != 5 or pair.shape[1] != 2:
            raise ValueError(f"DiffAugment expects pairs [N, 2, C, H, W], got {list(pair.shape)}")
        x = pair
        for p in self.policy:
            if p == "color":
                x = rand_brightness(x, generator)
                x = rand_saturation(x, generator)
                x = rand_contrast(x, generator)
            elif p == "translation":
                x = rand_translation(x, self.translation_ratio, generator)
            elif p == "cutout":
                x = rand_cutout(x, self.cutout_ratio, generator)
        return x

    def __repr__(self) -> str:
        return f"DiffAugment(policy={','.join(self.policy)!r}, translation_ratio={self.translation_ratio})"


def random_xflip(pair: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each real pair horizontally with probability p, both frames together (official `mirror: 1`)."""
    flip = torch.rand(pair.shape[0], device=pair.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1, 1), pair.flip(-1), pair)
