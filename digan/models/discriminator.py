"""DIGAN's two discriminators: StyleGAN2 "resnet" discriminators (official `ImageDiscriminator`).

- `ImageDiscriminator` (D_I): single frames [N, 3, H, W] -> logits [N]; it sees both frames of every pair.
- `MotionDiscriminator` (D_M): [N, 7, H, W] = cat(frame_early, frame_late, dt plane) -> logits [N]; a plain
  2D conv net, time enters only through channel stacking and the constant dt plane (`motion_input`).

Blocks run from `resolution` down to 8 (channels min(d_channel_base // res, d_channel_max)), each
    skip = FIR-down + 1x1 conv (no bias, gain sqrt(1/2));  x = conv3x3 -> FIR-down + conv3x3 (gain sqrt(1/2))
    x = skip + x
with fromRGB (1x1) in the first block; then the epilogue at 4x4: minibatch-stddev (group 4, 1 channel),
conv 3x3 (C + 1 -> C), FC (16 C -> C), FC (C -> 1).

Class-conditional (model.num_classes > 0, StyleGAN2-ADA's projection discriminator, as the official code
builds it): the last FC outputs C features, the label goes through its own mapping network (embedding +
8 FC, lr x0.01, no z) to `cmap` [N, C], and the logit is <features, cmap> / sqrt(C).

Precision: on CUDA the top `d_fp16_resolutions` blocks run in fp16 and every conv output is clamped to
+-conv_clamp (official: 4 blocks, clamp 256). On CPU everything stays fp32 without clamping (CPU fp16
convolutions are slow and the clamp only guards fp16 overflow). Activations stay NCHW (see Conv2dLayer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from digan.models.layers import Conv2dLayer, FullyConnected, MappingNetwork, MinibatchStd

SQRT_HALF = math.sqrt(0.5)


class DiscriminatorBlock(nn.Module):
    """Resnet block at `resolution`: in_channels (0 = first block, reads the image) -> out_channels at res/2."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, use_fp16: bool):
        super().__init__()
        assert in_channels in (0, tmp_channels)
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu") if in_channels == 0 else None
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu")
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: Tensor | None, img: Tensor | None, cuda: bool, clamp: float | None) -> Tensor:
        dtype = torch.float16 if self.use_fp16 and cuda else self.conv0.weight.dtype
        if self.fromrgb is not None:
            x = self.fromrgb(img.to(dtype), clamp=clamp)
        else:
            x = x.to(dtype)
        y = self.skip(x, gain=SQRT_HALF)
        x = self.conv0(x, clamp=clamp)
        x = self.conv1(x, gain=SQRT_HALF, clamp=clamp)
        return y.add_(x)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch-stddev, conv 3x3, FC, FC -> one logit; always fp32."""

    def __init__(self, in_channels: int, resolution: int, mbstd_group: int, mbstd_channels: int, cmap_dim: int = 0):
        super().__init__()
        self.in_channels, self.resolution, self.cmap_dim = in_channels, resolution, cmap_dim
        self.mbstd = MinibatchStd(mbstd_group, mbstd_channels) if mbstd_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_channels, in_channels, 3, activation="lrelu")
        self.fc = FullyConnected(in_channels * resolution * resolution, in_channels, activation="lrelu")
        self.out = FullyConnected(in_channels, cmap_dim or 1)

    def forward(self, x: Tensor, clamp: float | None, cmap: Tensor | None = None) -> Tensor:
        if x.dtype == torch.float16:  # back to full precision for the head (parameters' dtype)
            x = x.to(self.out.weight.dtype)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x, clamp=clamp)
        # flatten in NCHW order (the official layout of fc's weight), whatever the memory format
        x = self.out(self.fc(x.contiguous().flatten(1)))
        if self.cmap_dim:  # projection onto the label's mapped embedding
            return (x * cmap).sum(dim=1) * (1 / math.sqrt(self.cmap_dim))
        return x.squeeze(1)


class Discriminator(nn.Module):
    """StyleGAN2 resnet discriminator over `img_channels`-channel inputs at `cfg.resolution`."""

    def __init__(self, cfg, img_channels: int):
        super().__init__()
        self.img_channels, self.resolution = img_channels, cfg.resolution
        self.conv_clamp = cfg.conv_clamp

        def channels(res: int) -> int:
            return min(cfg.d_channel_base // res, cfg.d_channel_max)

        log2 = int(math.log2(cfg.resolution))
        fp16_resolution = max(2 ** (log2 + 1 - cfg.d_fp16_resolutions), 8)
        self.blocks = nn.ModuleDict()
        res = cfg.resolution
        while res >= 8:
            in_channels = channels(res) if res < cfg.resolution else 0
            self.blocks[f"b{res}"] = DiscriminatorBlock(in_channels, channels(res), channels(res // 2), res,
                                                        img_channels, use_fp16=res >= fp16_resolution)
            res //= 2
        self.num_classes = cfg.num_classes
        cmap_dim = channels(4) if cfg.num_classes > 0 else 0
        if cfg.num_classes > 0:  # official: 8 layers, lr x0.01, embed features = cmap_dim
            self.mapping = MappingNetwork(0, cmap_dim, 8, 0.01, w_avg_beta=None, num_classes=cfg.num_classes)
        self.epilogue = DiscriminatorEpilogue(channels(4), 4, cfg.mbstd_group, cfg.mbstd_channels, cmap_dim)

    def forward(self, img: Tensor, c: Tensor | None = None) -> Tensor:
        """img [N, C, H, W] (+ class labels c [N] or [N, num_classes] when conditional) -> logits [N] (float32)."""
        if img.dim() != 4 or img.shape[1:] != (self.img_channels, self.resolution, self.resolution):
            raise ValueError(f"{type(self).__name__} expects [N, {self.img_channels}, {self.resolution}, "
                             f"{self.resolution}], got {list(img.shape)}")
        # fp16 + clamp only on CUDA (see the module docstring).
        img_cuda = img.is_cuda
        clamp = self.conv_clamp if img_cuda and self.conv_clamp > 0 else None
        x = None
        img = img.contiguous()
        for block in self.blocks.values():
            x = block(x, img, img_cuda, clamp)
            img = None  # only the first block reads the image
        if self.num_classes == 0:
            if c is not None:
                raise ValueError("class labels given to an unconditional discriminator (model.num_classes=0)")
            return self.epilogue(x, clamp)
        return self.epilogue(x, clamp, self.mapping(None, c))


class ImageDiscriminator(Discriminator):
    """D_I: judges single frames [N, 3, H, W] -> logits [N]."""

    def __init__(self, cfg):
        super().__init__(cfg, img_channels=3)


class MotionDiscriminator(Discriminator):
    """D_M: judges frame pairs with their time gap, x [N, 7, H, W] = cat(early, late, dt plane) -> logits [N]."""

    def __init__(self, cfg):
        super().__init__(cfg, img_channels=7)


def motion_input(pair: Tensor, dt: Tensor) -> Tensor:
    """D_M input from pairs [N, 2, 3, H, W] (earlier frame first) and time gaps dt [N] -> [N, 7, H, W]."""
    if pair.dim() != 5 or pair.shape[1] != 2:
        raise ValueError(f"pair must be [N, 2, C, H, W], got {list(pair.shape)}")
    n, _, c, h, w = pair.shape
    plane = dt.to(pair.dtype).reshape(n, 1, 1, 1).expand(n, 1, h, w)
    return torch.cat([pair.reshape(n, 2 * c, h, w), plane], dim=1)
