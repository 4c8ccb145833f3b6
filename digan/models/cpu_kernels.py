"""Kernels for CPU speed only: Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016) for the discriminator.

They help the demo, CI and CPU benchmarks; on GPUs cuDNN picks its own algorithms. Off unless switched on
(`enable()`): the distributed worker does so on CPU devices, `benchmarks/train_step.py` for its runs.
`Conv2dLayer` asks `applies(x, w)` and falls back to F.conv2d otherwise.

A 3x3 stride-1 convolution is ~80 % of D's FLOPs. On CPU, oneDNN runs it at the speed of its GEMMs,
and its backward costs 2.3x its forward. Winograd computes each 4x4 output tile from a 6x6 input tile
with 36 multiplies per (in, out) channel pair instead of 144; the multiplies become 36 batched GEMMs
[K, C] x [C, tiles], whose backward is two more GEMMs of the same size. Measured here on one core,
8 x 512 x 64^2: forward 1.2x, forward+backward 1.7x, forward+input-backward 1.4x faster than
F.conv2d. The transforms are fixed linear maps (the input one a pair of autograd Functions that are
each other's backward), so autograd, incl. R1's double backward, works unchanged. Relative error
~1e-5 in fp32 (F.conv2d: ~3e-6), like cuDNN's Winograd algorithms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_enabled = False


def enable(on: bool = True) -> None:
    """Switch the CPU kernels on (or off) for this process."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


_WINO_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINO_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINO_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_wino_cache: dict = {}


def _winograd_matrices(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """B^T (x) B^T [36, 36], G (x) G [36, 9] and (A^T (x) A^T)^T [36, 16], each contiguous."""
    key = (dtype, device)
    if key not in _wino_cache:
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_WINO_BT, _WINO_G, _WINO_AT))
        bk, gk, ak = (torch.kron(m, m).to(dtype=dtype, device=device) for m in (bt, g, at))
        _wino_cache[key] = (bk, gk, ak.t().contiguous())
    return _wino_cache[key]


# Layouts. The batched GEMM wants the 36 transform points outermost ([36, C, tiles]); images are NCHW with
# a tile's 4 or 6 pixels of a row innermost. Each transform below is one GEMM whose *other* operand is read
# transposed (MKL takes either orientation for free), chosen so that the one layout copy left moves runs
# of 4 contiguous floats rather than single floats 4 MB apart (a strided scalar copy ran at ~1.5 GB/s here).


class _WinogradInput(torch.autograd.Function):
    """x [N, C, H, W] -> V [36, C, N*h*w]: B^T d B of every 6x6 tile (stride 4) of x zero-padded by 1."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        n, c, height, width = x.shape
        ctx.shape = x.shape
        bk = _winograd_matrices(x.dtype, x.device)[0]
        # a 1-channel conv with the 36 basis patterns computes all transformed tiles of every channel
        xp = F.pad(x, (1, 1, 1, 1)).reshape(n * c, 1, height + 2, width + 2)
        v = F.conv2d(xp, bk.view(36, 1, 6, 6), stride=4)  # [N*C, 36, h, w]
        return v.reshape(n, c, 36, -1).permute(2, 1, 0, 3).reshape(36, c, -1)

    @staticmethod
    def backward(ctx, grad_v: Tensor) -> Tensor:
        # The adjoint is another fixed linear map; going through .apply keeps double backward (R1) working.
        return _WinogradInputAdjoint.apply(grad_v, ctx.shape)


class _WinogradInputAdjoint(torch.autograd.Function):
    """The transpose of `_WinogradInput`: B (.) B of each tile, overlapping tiles summed back onto the image.

    Written by hand because autograd's version (the backward of the 1-channel strided conv) measured 3x
    slower here. One GEMM gives every tile's 6x6 pixels in a row ([C, N, h, w, 6, 6]); tiles overlap by 2
    pixels, so the sum is four block copies/adds: the 4x4 cores, then the 2-wide right/bottom margins onto
    the next tile's first columns/rows.
    """

    @staticmethod
    def forward(ctx, grad_v: Tensor, shape) -> Tensor:
        n, c, height, width = shape
        h, w = height // 4, width // 4
        bk = _winograd_matrices(grad_v.dtype, grad_v.device)[0]
        t = torch.mm(grad_v.reshape(36, -1).t(), bk)  # [C*N*h*w, 36]
        t = t.view(c, n, h, w, 6, 6).permute(1, 0, 2, 4, 3, 5)  # [N, C, h, 6, w, 6]
        g = grad_v.new_empty(n, c, h + 1, 4, w + 1, 4)  # the padded image as 4x4 blocks (one spare)
        g[:, :, h].zero_()
        g[:, :, :h, :, w].zero_()
        g[:, :, :h, :, :w] = t[:, :, :, :4, :, :4]
        g[:, :, 1:, :2, :w] += t[:, :, :, 4:, :, :4]
        g[:, :, :h, :, 1:, :2] += t[:, :, :, :4, :, 4:]
        g[:, :, 1:, :2, 1:, :2] += t[:, :, :, 4:, :, 4:]
        return g.view(n, c, height + 4, width + 4)[:, :, 1:height + 1, 1:width + 1].contiguous()

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        return _WinogradInput.apply(grad_x), None


class _WinogradOutput(torch.autograd.Function):
    """M [36, K, N*h*w] -> y [N, K, 4h, 4w]: A^T m A of every tile, placed as 4x4 output blocks."""

    @staticmethod
    def forward(ctx, m: Tensor, n: int, h: int, w: int) -> Tensor:
        k = m.shape[1]
        akt = _winograd_matrices(m.dtype, m.device)[2]
        y = torch.mm(m.reshape(36, -1).t(), akt)  # [K*N*h*w, 16]: each tile's 4x4 outputs in a row
        return y.view(k, n, h, w, 4, 4).permute(1, 0, 2, 4, 3, 5).reshape(n, k, 4 * h, 4 * w)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return _WinogradOutputAdjoint.apply(grad_y), None, None, None


class _WinogradOutputAdjoint(torch.autograd.Function):
    """The transpose of `_WinogradOutput`: grad y [N, K, 4h, 4w] -> grad M [36, K, N*h*w]."""

    @staticmethod
    def forward(ctx, grad_y: Tensor) -> Tensor:
        n, k, height, width = grad_y.shape
        h, w = height // 4, width // 4
        ctx.dims = (n, h, w)
        akt = _winograd_matrices(grad_y.dtype, grad_y.device)[2]
        g = grad_y.reshape(n, k, h, 4, w, 4).permute(1, 0, 2, 4, 3, 5).reshape(-1, 16)  # [K*N*h*w, 16]
        return torch.mm(akt, g.t()).view(36, k, n * h * w)

    @staticmethod
    def backward(ctx, grad_m: Tensor):
        return _WinogradOutput.apply(grad_m, *ctx.dims)


def conv3x3_winograd(x: Tensor, weight: Tensor) -> Tensor:
    """conv2d(x, weight, padding=1) for a 3x3 kernel and H, W divisible by 4, via Winograd F(4x4, 3x3)."""
    n, c, height, width = x.shape
    k = weight.shape[0]
    gk = _winograd_matrices(x.dtype, x.device)[1]  # G (x) G [36, 9]
    v = _WinogradInput.apply(x)  # [36, C, N*h*w]
    # G g G^T per kernel. The transposed weight is made contiguous so that autograd's gradient is
    # gk^T @ grad_u (streamed) rather than a GEMM reading grad_u column-wise (~10x slower here).
    u = (gk @ weight.reshape(k * c, 9).t().contiguous()).view(36, k, c)
    m = torch.bmm(u, v)  # [36, K, N*h*w]: the element-wise products, summed over C
    return _WinogradOutput.apply(m, n, height // 4, width // 4)  # A^T m A: 4x4 output tiles


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `conv3x3_winograd` should replace conv2d(x, weight, padding=1): switched on (`enable`) and a shape
    where it measured faster."""
    # CPU only (cuDNN picks its own algorithms), fp32/fp64, and only where it measured faster: wide layers
    # (>= 384 channels in and out; at 256 the forward is 0.8x, at 64-128 the transforms dominate) on maps
    # of at least 16x16 (at 8x8 the backward is slower).
    return (_enabled and weight.shape[2:] == (3, 3) and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and min(weight.shape[0], weight.shape[1]) >= 384
            and x.shape[2] % 4 == 0 and x.shape[3] % 4 == 0 and min(x.shape[2], x.shape[3]) >= 16)
