"""Building blocks shared by the generator and the discriminators (pure PyTorch, no custom CUDA ops).

Everything follows StyleGAN2's *equalized learning rate*: parameters are stored N(0, 1) / lr_mult and
scaled at run time by `lr_mult / sqrt(fan_in)`, so Adam sees the same update size for every layer and
the mapping network's lr multiplier (0.01) needs no optimizer parameter groups.

Activation gains are folded into the (tiny) weights instead of being applied to the (large) activations:
leaky_relu is positively homogeneous, lrelu(y) * g == lrelu(g * y) for g > 0, so
`lrelu(conv(x, w) + b) * sqrt(2)` is computed as `lrelu(conv(x, sqrt(2) w) + sqrt(2) b)` - one pass over
the activations fewer per layer, forward and backward, with the same result up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.2  # StyleGAN2 leaky ReLU slope
LRELU_GAIN = math.sqrt(2.0)  # its default gain (keeps the second moment of N(0, 1) inputs)
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)  # StyleGAN2's resampling low-pass filter


# ----------------------------------------------------------------------------------------------------
# Small functions.


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Scale every sample to unit RMS along `dim` (StyleGAN2 normalises z this way before mapping)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def generate_coords(n: int, device: torch.device | str | None = None) -> Tensor:
    """The official INR coordinate grid of an n x n image, flattened: [2, n*n] in row-major pixel order.

    x_j = 2j/n - 1 for column j and y_i = 2(n-1-i)/n - 1 for row i (align_corners=False, y flipped so the
    top row has the largest y); channel 0 is x, channel 1 is y. A denser grid (n * s) contains the coarse
    one exactly: coarse pixel (i, j) sits at fine pixel (s*i + s - 1, s*j), the *bottom-left* sample of its
    s x s block, because y is flipped.
    """
    row = torch.arange(n, device=device, dtype=torch.float32) / n * 2 - 1  # exact for power-of-two n
    x = row.view(1, n).expand(n, n)
    y = row.flip(0).view(n, 1).expand(n, n)
    return torch.stack([x, y]).reshape(2, n * n)


def upsample2x_nearest(x: Tensor, size: int) -> Tensor:
    """Nearest x2 upsampling of [B, C, F * size * size] (F frames of size x size) -> [B, C, F * 4 * size^2]."""
    # expand + reshape (one copy) measured 3-5x faster than F.interpolate(mode="nearest") here, backward too
    b, c, n = x.shape
    rows = n // size  # frames * size
    y = x.reshape(b, c, rows, 1, size, 1).expand(b, c, rows, 2, size, 2)
    return y.reshape(b, c, rows * 4 * size)


def fir_filter_2d(taps=FIR_TAPS) -> Tensor:
    """Separable low-pass filter as a normalised 2D kernel (sum 1), like `upfirdn2d.setup_filter`."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = f[:, None] * f[None, :]
    return f / f.sum()


# ----------------------------------------------------------------------------------------------------
# Equalized-lr fully connected layer.


class FullyConnected(nn.Module):
    """Linear layer with equalized lr: y = act(x W^T * lr_mult/sqrt(in) + b * lr_mult), act gain folded."""

    def __init__(self, in_features: int, out_features: int, activation: str = "linear",
                 lr_mult: float = 1.0, bias: bool = True, bias_init: float = 0.0):
        super().__init__()
        assert activation in ("linear", "lrelu"), activation
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        act_gain = LRELU_GAIN if activation == "lrelu" else 1.0
        self.weight_gain = lr_mult / math.sqrt(in_features) * act_gain
        self.bias_gain = lr_mult * act_gain

    def forward(self, x: Tensor) -> Tensor:
        # Scale the (small) input rather than the (up to 512 x 10240) weight: same product, less traffic.
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        x = F.linear(x * self.weight_gain, self.weight.to(x.dtype), b)
        if self.activation == "lrelu":
            x = F.leaky_relu(x, LRELU_SLOPE)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation}"


# ----------------------------------------------------------------------------------------------------
# FIR low-pass filtering as a depthwise conv, with a hand-written adjoint.
#
# PyTorch's generic double backward of a grouped conv (needed by R1) computes a filter gradient with one
# conv per channel: 2 x 384 small convs per FIR layer made an R1 step of a 384-channel D ~100x slower.
# The FIR is linear with a fixed filter, so its backward is its adjoint (a depthwise transposed conv) and
# the adjoint's backward is the FIR again: two autograd Functions that call each other.


class _FIR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, f: Tensor, pad: int, stride: int) -> Tensor:
        ctx.f, ctx.pad, ctx.stride, ctx.size = f, pad, stride, x.shape[-2:]
        return F.conv2d(x, f, stride=stride, padding=pad, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _FIRAdjoint.apply(grad, ctx.f, ctx.pad, ctx.stride, ctx.size), None, None, None


class _FIRAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad: Tensor, f: Tensor, pad: int, stride: int, size) -> Tensor:
        ctx.f, ctx.pad, ctx.stride = f, pad, stride
        k = f.shape[-1]
        extra = [size[i] - ((grad.shape[2 + i] - 1) * stride - 2 * pad + k) for i in range(2)]
        return F.conv_transpose2d(grad, f, stride=stride, padding=pad, output_padding=extra, groups=grad.shape[1])

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        return _FIR.apply(grad_x, ctx.f, ctx.pad, ctx.stride), None, None, None, None


def fir_filter(x: Tensor, f: Tensor, pad: int, stride: int = 1) -> Tensor:
    """Depthwise FIR filter `f` [C, 1, k, k] over x [N, C, H, W] with zero padding `pad` and `stride`."""
    return _FIR.apply(x, f, pad, stride)


# ----------------------------------------------------------------------------------------------------
# Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016) for the discriminator on CPU.
#
# A 3x3 stride-1 convolution is ~80 % of D's FLOPs. On CPU, oneDNN runs it at the speed of its GEMMs,
# and its backward costs 2.3x its forward. Winograd computes each 4x4 output tile from a 6x6 input tile
# with 36 multiplies per (in, out) channel pair instead of 144; the multiplies become 36 batched GEMMs
# [K, C] x [C, tiles], whose backward is two more GEMMs of the same size. Measured here on one core,
# 8 x 512 x 64^2: forward 1.2x, forward+backward 1.7x, forward+input-backward 1.4x faster than
# F.conv2d. The transforms are fixed linear maps (the input one a pair of autograd Functions that are
# each other's backward), so autograd, incl. R1's double backward, works unchanged. Relative error
# ~1e-5 in fp32 (F.conv2d: ~3e-6), like cuDNN's Winograd algorithms.

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


def _use_winograd(x: Tensor, weight: Tensor) -> bool:
    # CPU only (cuDNN picks its own algorithms), fp32/fp64, and only where it measured faster: wide layers
    # (>= 384 channels in and out; at 256 the forward is 0.8x, at 64-128 the transforms dominate) on maps
    # of at least 16x16 (at 8x8 the backward is slower).
    return (weight.shape[2:] == (3, 3) and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and min(weight.shape[0], weight.shape[1]) >= 384
            and x.shape[2] % 4 == 0 and x.shape[3] % 4 == 0 and min(x.shape[2], x.shape[3]) >= 16)


# ----------------------------------------------------------------------------------------------------
# Discriminator convolution with optional FIR downsampling.


class Conv2dLayer(nn.Module):
    """StyleGAN2 `Conv2dLayer` (equalized lr, bias, lrelu * sqrt(2), optional clamp, optional down=2).

    Downsampling matches `conv2d_resample` with the [1, 3, 3, 1] filter:
    - k x k kernel (k > 1): FIR low-pass (4 x 4 depthwise conv, padding 2), then the conv with stride 2;
    - 1 x 1 kernel: the FIR as a *strided* depthwise conv (stride 2, padding 1), then the 1 x 1 conv, so the
      filter is only evaluated at the kept pixels.
    NCHW (contiguous) layout: on CPU, oneDNN's channels_last 3x3 conv backward measured 2x slower here.
    """

    winograd = True  # stride-1 3x3 convs use `conv3x3_winograd` where it is faster (class-wide switch)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", down: int = 1):
        super().__init__()
        assert activation in ("linear", "lrelu"), activation
        assert down in (1, 2), down
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.activation, self.down = activation, down
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.act_gain = LRELU_GAIN if activation == "lrelu" else 1.0
        if down > 1:
            # Depthwise FIR kernel, one copy per input channel (a buffer: it is not learned).
            f = fir_filter_2d().expand(in_channels, 1, 4, 4).contiguous()
            self.register_buffer("fir", f, persistent=False)

    def forward(self, x: Tensor, gain: float = 1.0, clamp: float | None = None) -> Tensor:
        g = self.act_gain * gain  # folded into w and b (see the module docstring)
        w = (self.weight * (self.weight_gain * g)).to(x.dtype)
        b = (self.bias * g).to(x.dtype) if self.bias is not None else None
        k = self.kernel_size
        if self.down > 1:
            fir = self.fir.to(x.dtype)
            if k == 1:
                x = fir_filter(x, fir, pad=1, stride=2)
                x = F.conv2d(x, w, b)
            else:
                x = fir_filter(x, fir, pad=2)
                x = F.conv2d(x, w, b, stride=2)
        elif self.winograd and _use_winograd(x, w):
            x = conv3x3_winograd(x, w)
            if b is not None:
                x = x.add_(b.view(1, -1, 1, 1))  # in place on the fresh output tensor
        else:
            x = F.conv2d(x, w, b, padding=k // 2)
        if self.activation == "lrelu":
            # In place: conv2d's backward needs its inputs, not its output.
            x = F.leaky_relu_(x, LRELU_SLOPE)
        if clamp is not None:
            x = x.clamp(-clamp * gain, clamp * gain)
        return x

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"activation={self.activation}, down={self.down}")


class MinibatchStd(nn.Module):
    """Minibatch standard deviation (StyleGAN2): appends `num_channels` channels of group stddev.

    Groups are strided (sample i joins i + N/G, i + 2N/G, ...), exactly like the official reshape.
    """

    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            raise ValueError(f"minibatch-stddev: batch {n} is not divisible by the group size {g} "
                             f"(model.mbstd_group); use a batch that is a multiple of it")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0)
        y = (y + 1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4])  # [n/g, F]
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
