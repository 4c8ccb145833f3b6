"""The proxy feature networks: fixed-seed, randomly initialised, small. For CPU runs and CI only.

Numbers computed with these nets are reported as `proxy_fvd16`, `proxy_kvd16`, `proxy_fid`, never as
FVD/KVD/FID: they are comparable only with each other, at the same seed, architecture, protocol and N.
Random embeddings still rank sample sets sensibly (Naeem et al., ICML 2020), and the 3D net mixes
frames, so temporal corruption raises the video proxy (tests/test_metrics_behaviour.py).

The weights come from a private `torch.Generator` seeded with `seed`, on CPU, so two processes (or
two Ray workers) build bit-identical nets whatever the global RNG state. Adaptive average pooling
makes the nets accept any clip from 32 to 64+ px and 8 to 128 frames; the detector wrapper resizes
to a fixed `input_size` first so that real and fake clips of different sizes are comparable.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PROXY_SEED = 20220125  # the default seed of the proxy weights (arbitrary, fixed forever)


def _seeded_init_(module: nn.Module, seed: int) -> None:
    """He-normal conv weights (fan-in, leaky-ReLU gain), zero biases, from a private generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fan_in = m.weight[0].numel()
            std = math.sqrt(2.0 / (1 + 0.2**2) / fan_in)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if m.bias is not None:
                    m.bias.zero_()


class ProxyVideoNet(nn.Module):
    """Four strided 3D convs (6 -> 32 -> 64 -> 128 -> 256) with leaky ReLU, then a global average
    over (T, H, W): x [B, 3, T, H, W] -> features [B, 256]. The input is the clip and its temporal
    difference x[t+1] - x[t]: random filters alone average motion out almost entirely (frame-shuffled
    clips scored like real ones), the explicit difference channels make the proxy see motion."""

    feature_dim = 256

    def __init__(self, seed: int = PROXY_SEED):
        super().__init__()
        ch = [6, 32, 64, 128, self.feature_dim]
        t_stride = [1, 1, 2, 2]
        self.convs = nn.ModuleList(
            nn.Conv3d(ch[i], ch[i + 1], kernel_size=(3, 4, 4), stride=(t_stride[i], 2, 2), padding=(1, 1, 1))
            for i in range(4)
        )
        _seeded_init_(self, seed)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 0, 1))  # zero after the last frame
        x = torch.cat([x, 4 * dx], dim=1)  # x4: natural frame differences are a few % of the range
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return F.adaptive_avg_pool3d(x, 1).flatten(1)


class ProxyFrameNet(nn.Module):
    """The per-frame counterpart (for `proxy_fid`): the same recipe with 2D convs.
    x [N, 3, H, W] -> features [N, 256]."""

    feature_dim = 256

    def __init__(self, seed: int = PROXY_SEED + 1):
        super().__init__()
        ch = [3, 32, 64, 128, self.feature_dim]
        self.convs = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1) for i in range(4))
        _seeded_init_(self, seed)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
