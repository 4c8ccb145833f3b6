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

from digan.models import cpu_kernels

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
# Mapping network (G's z -> w; the conditional discriminators' label -> cmap).


class MappingNetwork(nn.Module):
    """(z, class label) -> w: 2nd-moment normalised z and label embedding, concatenated, then `num_layers` FC +
    lrelu with lr multiplier; tracks w_avg for truncation (official StyleGAN2-ADA `MappingNetwork`).

    `num_classes` > 0 adds `embed` (one-hot label -> w_dim features, normalised like z); `z_dim` = 0 maps the
    label alone (the discriminators' label mapping, which tracks no w_avg)."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 2, lr_mult: float = 0.01,
                 w_avg_beta: float | None = 0.995, num_classes: int = 0):
        super().__init__()
        self.z_dim, self.w_dim, self.num_layers, self.w_avg_beta = z_dim, w_dim, num_layers, w_avg_beta
        self.num_classes = num_classes
        self.embed = FullyConnected(num_classes, w_dim) if num_classes > 0 else None
        dims = [z_dim + (w_dim if num_classes > 0 else 0)] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], activation="lrelu", lr_mult=lr_mult))
        if w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor | None, c: Tensor | None = None, truncation_psi: float = 1.0) -> Tensor:
        parts = [normalize_2nd_moment(z.to(torch.float32))] if self.z_dim > 0 else []
        if self.embed is not None:
            parts.append(normalize_2nd_moment(self.embed(class_onehot(c, self.num_classes))))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if self.w_avg_beta is not None and self.training:
            # Moving average of w for truncation (official beta 0.995); no gradient flows into it.
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1:
            x = self.w_avg.lerp(x, truncation_psi)
        return x


def class_onehot(c: Tensor | None, num_classes: int) -> Tensor:
    """Class labels as the mapping networks take them: int64 indices [B] -> one-hot float32 [B, num_classes]
    (a float [B, num_classes] passes through: mixtures of classes)."""
    if c is None:
        raise ValueError(f"a class-conditional model (model.num_classes={num_classes}) needs class labels")
    if c.dtype in (torch.int64, torch.int32):
        # The range is checked where it costs no host-device sync (CPU labels: the CLIs, tests); on a GPU an
        # out-of-range index fails in the scatter kernel instead. Training moves labels once per step.
        if c.dim() != 1 or (not c.is_cuda and c.numel() and (int(c.min()) < 0 or int(c.max()) >= num_classes)):
            raise ValueError(f"class labels must be indices [B] in [0, {num_classes}), got {c.tolist()[:8]}")
        return torch.zeros(c.shape[0], num_classes, device=c.device).scatter_(1, c.long()[:, None], 1.0)
    if c.dim() != 2 or c.shape[1] != num_classes:
        raise ValueError(f"class labels must be [B] indices or [B, {num_classes}] weights, got {list(c.shape)}")
    return c.to(torch.float32)


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
# Discriminator convolution with optional FIR downsampling.


class Conv2dLayer(nn.Module):
    """StyleGAN2 `Conv2dLayer` (equalized lr, bias, lrelu * sqrt(2), optional clamp, optional down=2).

    Downsampling matches `conv2d_resample` with the [1, 3, 3, 1] filter:
    - k x k kernel (k > 1): FIR low-pass (4 x 4 depthwise conv, padding 2), then the conv with stride 2;
    - 1 x 1 kernel: the FIR as a *strided* depthwise conv (stride 2, padding 1), then the 1 x 1 conv, so the
      filter is only evaluated at the kept pixels.
    NCHW (contiguous) layout: on CPU, oneDNN's channels_last 3x3 conv backward measured 2x slower here.
    """

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
        elif cpu_kernels.applies(x, w):  # off unless switched on (CPU speed only)
            x = cpu_kernels.conv3x3_winograd(x, w)
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
