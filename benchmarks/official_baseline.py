"""Same-machine baseline: one iteration computed the way the official DIGAN code computes it on a CPU.

A stand-in for when no checkout of the official code is at hand. With one, benchmarks/official_code.py
runs the official code itself (`benchmarks/train_step.py --official-repo PATH` adds it as the
`official-code` row and judges the target against that row, not this one). This module times the official
*computation*, interleaved with ours, on the same weights: a transcription of the official structure, not
the official source, following these official choices:

- discriminators: StyleGAN2-ADA ops on CPU in fp32 (the fp16 blocks are CUDA-only), NCHW;
  `conv2d_resample` (FIR by `upfirdn2d`'s reference path: pad, 4x4 depthwise conv at full resolution,
  then subsample; a 3x3 "down" conv is FIR then stride-2 conv); `bias_act`'s reference path (bias add,
  leaky ReLU and gain as separate passes); resnet blocks, minibatch-stddev, epilogue;
- loss phases of `OurStyleGAN2Loss` / StyleGAN2-ADA's loop: Gmain (backward, Adam step), Greg (no
  path-length reg, an Adam step with no gradients), Dmain with separate backward passes for the fake and
  the real half, and on lazy-R1 iterations a separate Dreg phase (its own real forward, R1 through both
  discriminators, backward, Adam step);
- the generator is OUR generator module (the official one renders per frame with the same pixel
  FLOPs); so any speed-up of our G over the official is not credited here (conservative).

Parameters are read from our modules (`digan.models`), so the baseline has exactly our shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from digan.training.loss import DIGANLoss, motion_input
from digan.training.recipe import frozen

LRELU_GAIN = math.sqrt(2.0)


def _fir(channels: int, dtype: torch.dtype) -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = f[:, None] * f[None, :]
    return (f / f.sum()).to(dtype).expand(channels, 1, 4, 4)


def _upfirdn2d_ref(x: torch.Tensor, pad: int, down: int) -> torch.Tensor:
    """upfirdn2d's reference path: zero pad, depthwise 4x4 FIR at full resolution, then subsample."""
    x = F.pad(x, [pad] * 4)
    x = F.conv2d(x, _fir(x.shape[1], x.dtype), groups=x.shape[1])
    return x[:, :, ::down, ::down] if down > 1 else x


def _bias_act_ref(x: torch.Tensor, b: torch.Tensor | None, lrelu: bool, gain: float) -> torch.Tensor:
    """bias_act's reference path: separate bias, activation and gain passes."""
    if b is not None:
        x = x + b.reshape(1, -1, 1, 1)
    if lrelu:
        x = F.leaky_relu(x, 0.2)
    return x * gain if gain != 1 else x


def _conv(layer, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Official Conv2dLayer.forward with conv2d_resample, from our layer's parameters."""
    w = layer.weight * layer.weight_gain
    if layer.down == 2 and layer.kernel_size == 1:
        x = F.conv2d(_upfirdn2d_ref(x, 1, 2), w)  # FIR + subsample first, then the 1x1 conv
    elif layer.down == 2:
        x = F.conv2d(_upfirdn2d_ref(x, 2, 1), w, stride=2)
    else:
        x = F.conv2d(x, w, padding=layer.kernel_size // 2)
    lrelu = layer.activation == "lrelu"
    return _bias_act_ref(x, layer.bias, lrelu, (LRELU_GAIN if lrelu else 1.0) * gain)


def _fc(layer, x: torch.Tensor) -> torch.Tensor:
    """Official FullyConnectedLayer (our layers fold the lrelu gain into weight_gain / bias_gain)."""
    lrelu = layer.activation == "lrelu"
    act_gain = LRELU_GAIN if lrelu else 1.0
    w = layer.weight * (layer.weight_gain / act_gain)
    b = layer.bias * (layer.bias_gain / act_gain)
    if not lrelu:
        return torch.addmm(b.unsqueeze(0), x, w.t())
    return F.leaky_relu(x.matmul(w.t()) + b, 0.2) * act_gain


def _mbstd(x: torch.Tensor, group: int) -> torch.Tensor:
    n, c, h, w = x.shape
    g = min(group, n)
    y = x.reshape(g, -1, 1, c, h, w)
    y = ((y - y.mean(dim=0)).square().mean(dim=0) + 1e-8).sqrt().mean(dim=[2, 3, 4])
    return torch.cat([x, y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)], dim=1)


def official_discriminator(D, img: torch.Tensor) -> torch.Tensor:
    """Official resnet discriminator forward (fp32, NCHW) on D's parameters -> logits [N]."""
    x = None
    for block in D.blocks.values():
        if block.fromrgb is not None:
            x = _conv(block.fromrgb, img.contiguous())
        y = _conv(block.skip, x, gain=math.sqrt(0.5))
        x = _conv(block.conv0, x)
        x = _conv(block.conv1, x, gain=math.sqrt(0.5))
        x = y.add_(x)
    ep = D.epilogue
    x = _mbstd(x, ep.mbstd.group_size) if ep.mbstd is not None else x
    x = _conv(ep.conv, x)
    return _fc(ep.out, _fc(ep.fc, x.flatten(1))).squeeze(1)


def _run_D(loss: DIGANLoss, D_img, D_mot, x: torch.Tensor):
    """Official run_D: DiffAugment on the pair, Δt plane re-attached, both Ds; returns D_I's input too."""
    pair = loss.augment(x[:, :6].unflatten(1, (2, 3)))
    frames = pair.flatten(0, 1)
    logits_M = official_discriminator(D_mot, torch.cat([pair.flatten(1, 2), x[:, 6:]], dim=1))
    logits_I = official_discriminator(D_img, frames)
    return logits_M, logits_I, frames


def _step(module, opt: torch.optim.Optimizer, grad_clamp: float) -> None:
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=grad_clamp, neginf=-grad_clamp).clamp_(-grad_clamp, grad_clamp)
    opt.step()


def official_g_phase(G, D, g_opt, loss: DIGANLoss, batch_size: int, grad_clamp: float = 1e5) -> None:
    """Gmain (+ Greg's empty Adam step): D frozen, fresh z, one backward."""
    g_opt.zero_grad(set_to_none=True)
    with frozen(D):
        fake_pair, fake_dt = loss.generate_pairs(G, batch_size)
        logits_M, logits_I, _ = _run_D(loss, D.img, D.mot, motion_input(fake_pair, fake_dt))
        (F.softplus(-logits_M).mean() + F.softplus(-logits_I).mean()).backward()
    _step(G, g_opt, grad_clamp)
    g_opt.zero_grad(set_to_none=True)  # Greg: no path-length term, the step sees no gradients
    _step(G, g_opt, grad_clamp)


def official_d_phase(G, D, d_opt, loss: DIGANLoss, real_pair, real_dt, grad_clamp: float = 1e5) -> None:
    """Dmain: fake half and real half with separate backward passes, then one Adam step."""
    d_opt.zero_grad(set_to_none=True)
    with torch.no_grad(), frozen(G):  # official: G's requires_grad is off outside its phases
        fake_pair, fake_dt = loss.generate_pairs(G, real_pair.shape[0])
    logits_M, logits_I, _ = _run_D(loss, D.img, D.mot, motion_input(fake_pair, fake_dt))
    (F.softplus(logits_M).mean() + F.softplus(logits_I).mean()).backward()
    x_real = motion_input(real_pair, real_dt)
    logits_M, logits_I, _ = _run_D(loss, D.img, D.mot, x_real)
    (F.softplus(-logits_M).mean() + F.softplus(-logits_I).mean()).backward()
    _step(D, d_opt, grad_clamp)


def official_r1_phase(D, d_opt, loss: DIGANLoss, real_pair, real_dt, grad_clamp: float = 1e5) -> None:
    """Dreg: its own real forward, R1 for D_M (raw 7-ch input) and D_I (augmented frames), gain = interval."""
    d_opt.zero_grad(set_to_none=True)
    x_real = motion_input(real_pair, real_dt).detach().requires_grad_(True)
    logits_M, logits_I, frames = _run_D(loss, D.img, D.mot, x_real)
    (g_M,) = torch.autograd.grad(logits_M.sum(), x_real, create_graph=True)
    (g_I,) = torch.autograd.grad(logits_I.sum(), frames, create_graph=True)
    r1 = (logits_M * 0 + g_M.square().sum([1, 2, 3]) * (loss.r1_gamma / 2)).mean() \
        + (logits_I * 0 + g_I.square().sum([1, 2, 3]) * (loss.r1_gamma / 2)).mean()
    (r1 * loss.r1_interval).backward()
    _step(D, d_opt, grad_clamp)
