"""DIGAN generator: a video INR I(x, y, t) -> RGB whose weights come from a content code z_I and a motion code z_M.

Structure (official `networks.py` + `layers.py`, INR-GAN's multi-scale INR):

    z_I --normalise--> mapping MLP (2 x FC, lr x0.01) --> w
    every INR layer:  W_video = demod(W_shared * (1 + U V / sqrt(rank))),  [U; V] = affine(w)      (FMM)
    CoordFuser:       e(p, t) = [sin(W_xy p + b + phi(t)), cos(...)],  [W_xy; b] = affine(w)
                      phi(t) = MLP(leaky_relu_0.01(affine([w; z_M]) * t * sigma_t))
    blocks 4..input_resolution run on the input grid; each later block doubles the grid (nearest), adds a
    new CoordFuser embedding and runs 2 (+ extra) FMM layers; every block emits RGB, summed with nearest
    upsampling (StyleGAN2 "skip").

Rendering is split in two, so a long video never recomputes its weights per frame:
- `prepare(z, z_motion)` -> `VideoCode`: per-video FMM weights, toRGB weights and CoordFuser parameters;
- `render(code, t, scale)`: frames at times t [B, T]; every layer is ONE batched matmul per video over all
  T frames x pixels (activations laid out [B, C, T * H * W]).

Exact algebraic shortcuts (same function, less work than the official code):
- the sqrt(2) activation gain is folded into the per-video weights and biases (lrelu is homogeneous);
- the first FMM layer of an upsampling block sees cat(up2(x), emb): its x-part is applied at the LOW
  resolution and upsampled afterwards (nearest upsampling commutes with a 1x1 layer), 4x fewer FLOPs there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from digan.models.layers import (LRELU_GAIN, LRELU_SLOPE, FullyConnected, MappingNetwork, generate_coords,
                                 upsample2x_nearest)

MOTION_LRELU_SLOPE = 0.01  # official: F.leaky_relu with PyTorch's default slope inside phi(t)


# ----------------------------------------------------------------------------------------------------
# INR layers.


class FMMLayer(nn.Module):
    """1x1 INR layer with factorized multiplicative modulation (INR-GAN, rank 10, "demod" activation).

    Per video: W = W_shared * (1 + U V / sqrt(rank)), rows L2-normalised, times the lrelu gain sqrt(2).
    Per frame:  out = lrelu(W x + sqrt(2) b).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, rank: int):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.affine = FullyConnected(w_dim, (in_channels + out_channels) * rank, bias_init=0.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels))  # W_shared, no equalized gain
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def prepare(self, w: Tensor) -> Tensor:
        """Per-video weight [B, c_out, c_in] (demodulated, activation gain folded in)."""
        b, r, c_out, c_in = w.shape[0], self.rank, self.out_channels, self.in_channels
        styles = self.affine(w)
        u = styles[:, : c_out * r].reshape(b, c_out, r)
        v = styles[:, c_out * r:].reshape(b, r, c_in)
        weight = self.weight.unsqueeze(0)
        # W_shared * (1 + U V / sqrt(r)) = W_shared + W_shared * (U V) / sqrt(r)
        wv = weight * torch.baddbmm(torch.ones_like(weight), u, v, alpha=1.0 / math.sqrt(r))
        return wv * (LRELU_GAIN / (wv.norm(dim=2, keepdim=True) + 1e-8))

    def bias_term(self) -> Tensor:
        return (self.bias * LRELU_GAIN).view(1, -1, 1)

    def forward(self, weight: Tensor, x: Tensor) -> Tensor:
        """x [B, c_in, N] -> lrelu(W x + b) [B, c_out, N]."""
        return F.leaky_relu_(torch.baddbmm(self.bias_term(), weight, x), LRELU_SLOPE)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}"


class ToRGB(nn.Module):
    """StyleGAN2 modulated 1x1 toRGB without demodulation: style = affine(w) / sqrt(c_in) (bias init 1)."""

    def __init__(self, in_channels: int, w_dim: int, img_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def prepare(self, w: Tensor) -> Tensor:
        """Per-video [B, 3, c_in] weight."""
        styles = self.affine(w) * self.weight_gain
        return self.weight.unsqueeze(0) * styles.unsqueeze(1)

    def forward(self, weight: Tensor, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.view(1, -1, 1), weight, x)


class CoordFuser(nn.Module):
    """Spatio-temporal Fourier embedding of (x, y, t) with w-predicted frequencies (official CoordFuser).

    Per video: [W_xy; b] = xyaffine(w) (W_xy scaled by fourier_scale = sigma_x = sigma_y), a = affine([w; z_M]).
    Per frame:  phi(t) = motion_mlp(leaky_relu_0.01(a * t * sigma_t));
                e(p, t) = [sin(W_xy p + b + phi(t)), cos(W_xy p + b + phi(t))]   (2 * emb_size channels).
    """

    def __init__(self, w_dim: int, motion_z_dim: int, emb_size: int, fourier_scale: float, sigma_t: float,
                 fourier_lr_mult: float = 1.0):
        super().__init__()
        self.emb_size, self.fourier_scale, self.sigma_t = emb_size, fourier_scale, sigma_t
        self.xyaffine = FullyConnected(w_dim, emb_size * 2 + emb_size, bias_init=0.0, lr_mult=fourier_lr_mult)
        self.affine = FullyConnected(w_dim + motion_z_dim, emb_size, bias_init=0.0)
        self.motion_mlp = nn.Sequential(FullyConnected(emb_size, emb_size, activation="lrelu"),
                                        FullyConnected(emb_size, emb_size))

    @property
    def out_channels(self) -> int:
        return 2 * self.emb_size

    def prepare(self, w: Tensor, z_motion: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per video: frequencies W_xy [B, E, 2], phase b [B, E], motion vector a [B, E]."""
        e = self.emb_size
        mod = self.xyaffine(w)
        w_xy = self.fourier_scale * mod[:, : 2 * e].reshape(-1, e, 2)
        phase = mod[:, 2 * e:]
        motion = self.affine(torch.cat([w, z_motion.to(w.dtype)], dim=1))
        return w_xy, phase, motion

    def phi(self, motion: Tensor, t: Tensor) -> Tensor:
        """Motion phase phi(t) [B, T, E] for times t [B, T]."""
        a = F.leaky_relu(motion.unsqueeze(1) * t.unsqueeze(2) * self.sigma_t, MOTION_LRELU_SLOPE)
        return self.motion_mlp(a)

    def forward(self, code: tuple[Tensor, Tensor, Tensor], t: Tensor, n: int) -> Tensor:
        """Embedding on the n x n grid for all frames: [B, 2E, T * n * n] (frame-major, then row-major)."""
        w_xy, phase, motion = code
        coords = generate_coords(n, device=w_xy.device).to(w_xy.dtype)  # [2, P]
        spatial = torch.baddbmm(phase.unsqueeze(2), w_xy, coords.expand(w_xy.shape[0], 2, n * n))  # [B, E, P]
        arg = spatial.unsqueeze(2) + self.phi(motion, t).transpose(1, 2).unsqueeze(3)  # [B, E, T, P]
        b, e, frames, p = arg.shape
        return torch.cat([arg.sin(), arg.cos()], dim=1).reshape(b, 2 * e, frames * p)


# ----------------------------------------------------------------------------------------------------
# Blocks and the generator.


class SynthesisBlock(nn.Module):
    """One StyleGAN2 "skip" block of the INR.

    - `first`: input CoordFuser on the input grid + conv1 (emb -> c_out);
    - `up`:    nearest x2, CoordFuser at the new grid, conv0 (c_in + emb -> c_out), conv1;
    - else:    conv0, conv1 on the same grid (blocks 8..input_resolution);
    then `num_extra` more FMM layers and a toRGB.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, grid: int, cfg, num_extra: int):
        super().__init__()
        assert kind in ("first", "up", "same"), kind
        self.kind, self.grid = kind, grid
        self.in_channels, self.out_channels = in_channels, out_channels
        w_dim, rank = cfg.w_dim, cfg.fmm_rank
        self.coord_fuser = None
        if kind in ("first", "up"):
            self.coord_fuser = CoordFuser(w_dim, cfg.motion_z_dim, cfg.coord_emb_size, cfg.fourier_scale,
                                          cfg.sigma_t, cfg.fourier_lr_mult)
        emb = self.coord_fuser.out_channels if self.coord_fuser is not None else 0
        if kind == "first":
            self.conv0 = None
            self.conv1 = FMMLayer(emb, out_channels, w_dim, rank)
        else:
            self.conv0 = FMMLayer(in_channels + emb, out_channels, w_dim, rank)
            self.conv1 = FMMLayer(out_channels, out_channels, w_dim, rank)
        self.extra_convs = nn.ModuleList(FMMLayer(out_channels, out_channels, w_dim, rank) for _ in range(num_extra))
        self.torgb = ToRGB(out_channels, w_dim)

    def prepare(self, w: Tensor, z_motion: Tensor) -> dict:
        return {
            "fuser": self.coord_fuser.prepare(w, z_motion) if self.coord_fuser is not None else None,
            "conv0": self.conv0.prepare(w) if self.conv0 is not None else None,
            "conv1": self.conv1.prepare(w),
            "extra": [layer.prepare(w) for layer in self.extra_convs],
            "torgb": self.torgb.prepare(w),
        }

    def forward(self, code: dict, x: Tensor | None, img: Tensor | None, t: Tensor, scale: int):
        """x [B, c_in, T * n_in^2] (None for the first block), img [B, 3, T * n_in^2] -> same at this grid."""
        n = self.grid * scale
        if self.kind == "first":
            x = self.conv1(code["conv1"], self.coord_fuser(code["fuser"], t, n))
        elif self.kind == "up":
            # conv0 on cat(up2(x), emb) = up2(W_x x + b) + W_e emb: the x part runs at the low resolution.
            weight = code["conv0"]
            w_x, w_e = weight[:, :, : self.in_channels], weight[:, :, self.in_channels:]
            low = torch.baddbmm(self.conv0.bias_term(), w_x, x)
            emb = self.coord_fuser(code["fuser"], t, n)
            x = F.leaky_relu_(torch.baddbmm(upsample2x_nearest(low, n // 2), w_e, emb), LRELU_SLOPE)
            x = self.conv1(code["conv1"], x)
        else:
            x = self.conv0(code["conv0"], x)
            x = self.conv1(code["conv1"], x)
        for layer, weight in zip(self.extra_convs, code["extra"]):
            x = layer(weight, x)
        y = self.torgb(code["torgb"], x)
        if img is not None:
            y = y + (upsample2x_nearest(img, n // 2) if self.kind == "up" else img)
        return x, y


@dataclass
class VideoCode:
    """Everything about a batch of videos that does not depend on time: computed once by `Generator.prepare`.

    `w` [B, w_dim] is the mapped content code, `z_motion` [B, motion_z_dim] the motion code; `blocks` holds,
    per synthesis block, the per-video FMM / toRGB weights and CoordFuser parameters (all tensors keep
    their autograd history, so `render` is differentiable w.r.t. G's parameters).
    """

    w: Tensor
    z_motion: Tensor
    blocks: dict

    @property
    def batch_size(self) -> int:
        return self.w.shape[0]


class Generator(nn.Module):
    """DIGAN's INR video generator; all structure derived from a `ModelConfig`.

    forward(z [B, z_dim], z_motion [B, motion_z_dim], t [B, T], scale=1, c=None) -> frames [B, T, 3, H*scale,
    W*scale] (float, roughly in [-1, 1], not clamped); c: class labels when model.num_classes > 0. `scale` > 1 renders every block on an s-times denser
    coordinate grid (spatial super-resolution); `model.supersample` = s renders on an s-times denser
    grid still and averages each s x s block (a box anti-aliasing filter; 1 = official).
    """

    def __init__(self, cfg):
        super().__init__()
        self.z_dim, self.w_dim, self.motion_z_dim = cfg.z_dim, cfg.w_dim, cfg.motion_z_dim
        self.resolution, self.input_resolution = cfg.resolution, cfg.input_resolution
        self.img_channels, self.supersample = 3, cfg.supersample
        self.num_classes = cfg.num_classes
        self.mapping = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.mapping_lr_mult,
                                      num_classes=cfg.num_classes)

        def channels(res: int) -> int:
            return min(cfg.channel_base // res, cfg.channel_max)

        self.blocks = nn.ModuleDict()
        res, prev = 4, 0
        while res <= cfg.resolution:
            grid = max(res, cfg.input_resolution)
            kind = "first" if res == 4 else ("up" if res > cfg.input_resolution else "same")
            # Like the official `num_extra_convs`, extra layers are keyed by the grid a block runs on (so an
            # entry equal to input_resolution adds one to every trunk block); a repeated entry adds more.
            num_extra = list(cfg.extra_conv_resolutions).count(grid)
            self.blocks[f"b{res}"] = SynthesisBlock(kind, prev, channels(res), grid, cfg, num_extra)
            prev, res = channels(res), res * 2

    def prepare(self, z: Tensor, z_motion: Tensor, truncation_psi: float = 1.0, c: Tensor | None = None) -> VideoCode:
        """Per-video INR weights for content z [B, z_dim], motion z_motion [B, motion_z_dim] and, for a
        class-conditional model, class labels c ([B] indices or [B, num_classes] weights)."""
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [B, {self.z_dim}], got {list(z.shape)}")
        if z_motion.shape != (z.shape[0], self.motion_z_dim):
            raise ValueError(f"z_motion must be [{z.shape[0]}, {self.motion_z_dim}], got {list(z_motion.shape)}")
        if c is not None and self.num_classes == 0:
            raise ValueError("class labels given to an unconditional generator (model.num_classes=0)")
        return self.prepare_w(self.mapping(z, c, truncation_psi=truncation_psi), z_motion)

    def prepare_w(self, w: Tensor, z_motion: Tensor) -> VideoCode:
        """Per-video INR weights from mapped codes: w [B, w_dim] for every block, or [B, num_blocks, w_dim],
        one per synthesis block (W+, e.g. for fitting a real clip: `digan.predict`)."""
        z_motion = z_motion.to(w.dtype)
        blocks = {name: block.prepare(w[:, i] if w.dim() == 3 else w, z_motion)
                  for i, (name, block) in enumerate(self.blocks.items())}
        return VideoCode(w=w, z_motion=z_motion, blocks=blocks)

    def render(self, code: VideoCode, t: Tensor, scale: int = 1) -> Tensor:
        """Frames at times t [B, T] -> [B, T, 3, H*scale, W*scale]; any T, any t (t > 1 extrapolates)."""
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be an integer >= 1, got {scale}")
        scale = int(scale)
        if t.dim() != 2 or t.shape[0] != code.batch_size:
            raise ValueError(f"t must be [B={code.batch_size}, T], got {list(t.shape)}")
        t = t.to(code.w.dtype)
        x = img = None
        ss = self.supersample
        for name, block in self.blocks.items():
            x, img = block(code.blocks[name], x, img, t, scale * ss)
        b, frames, side = t.shape[0], t.shape[1], self.resolution * scale
        if ss > 1:  # box filter: the mean of each ss x ss block of the dense rendering
            img = F.avg_pool2d(img.reshape(b, 3 * frames, side * ss, side * ss), ss)
        return img.reshape(b, 3, frames, side, side).transpose(1, 2).contiguous()

    def forward(self, z: Tensor, z_motion: Tensor, t: Tensor, scale: int = 1, truncation_psi: float = 1.0,
                c: Tensor | None = None) -> Tensor:
        return self.render(self.prepare(z, z_motion, truncation_psi, c), t, scale)
