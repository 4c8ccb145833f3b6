"""DIGAN generator and discriminators: shapes, parameter parity with the official code, equivalence with a
literal transcription of the official forward passes, determinism, continuity in t, super-resolution,
chunked rendering, and the G_ema export."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digan.config import load_config
from digan.sampling import render_chunks, seed_latents
from digan.models import (build_discriminators, build_generator, find_generator_file, load_generator,
                          motion_input, save_generator)
from digan.models import cpu_kernels
from digan.models.cpu_kernels import conv3x3_winograd
from digan.models.layers import fir_filter, fir_filter_2d

# Official parameter counts (built from the official code at HEAD e822320).
OFFICIAL_G = 63_538_706
OFFICIAL_MAPPING = 525_312
OFFICIAL_COORD_FUSER = 361_216
OFFICIAL_D_TOTAL = 56_779_266


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_cfg(**overrides):
    """demo-32 with an extra conv on the 32 grid, so 'first', 'same', 'up' blocks and extras all occur."""
    ov = ["model.extra_conv_resolutions=[32]"] + [f"model.{k}={v}" for k, v in overrides.items()]
    return load_config("demo-32", ov)


@pytest.fixture(scope="module")
def small():
    cfg = small_cfg()
    torch.manual_seed(0)
    G = build_generator(cfg.model).eval()
    return cfg, G


# ----------------------------------------------------------------------------------------------------
# Literal transcriptions of the official code (src/training/networks.py, layers.py, StyleGAN2-ADA ops):
# per-frame weights (ws repeated T times), concatenated coordinate embeddings, upsampled features,
# bias_act with separate gain, upfirdn2d by pad + filter + subsample. Written independently of the
# optimised implementation to check its algebraic shortcuts.


def ref_fc(layer, x, act="linear"):
    w = layer.weight * layer.weight_gain / (math.sqrt(2) if layer.activation == "lrelu" else 1)
    b = layer.bias * layer.bias_gain / (math.sqrt(2) if layer.activation == "lrelu" else 1)
    x = x.matmul(w.t()) + b
    return F.leaky_relu(x, 0.2) * math.sqrt(2) if layer.activation == "lrelu" else x


def ref_coords(batch, n):
    row = (torch.arange(0, n).float() / n) * 2 - 1
    x_coords = row.view(1, -1).repeat(n, 1)
    y_coords = x_coords.t().flip(dims=(0,))
    coords = torch.stack([x_coords, y_coords], dim=2).view(-1, 2)
    return coords.t().view(1, 2, n, n).repeat(batch, 1, 1, 1)


def ref_mapping(mapping, z, c=None):
    """StyleGAN2-ADA's MappingNetwork: normalised z and (conditional) normalised label embedding, then the FCs."""
    parts = [] if z is None else [F.normalize(z, dim=1) * math.sqrt(z.shape[1])]  # normalize_2nd_moment
    if c is not None:
        y = ref_fc(mapping.embed, F.one_hot(c, mapping.num_classes).float())
        parts.append(F.normalize(y, dim=1) * math.sqrt(y.shape[1]))
    x = torch.cat(parts, dim=1)
    for i in range(mapping.num_layers):
        x = ref_fc(getattr(mapping, f"fc{i}"), x)
    return x


def ref_generator(G, z, z_motion, t, c=None):
    B, T = t.shape
    x = ref_mapping(G.mapping, z, c)
    w = x.unsqueeze(1).repeat(1, T, 1).view(B * T, -1)
    zm = z_motion.unsqueeze(1).repeat(1, T, 1).view(B * T, -1)
    Ts = t.reshape(B * T, 1, 1, 1)

    def fuser(f, n):
        e = f.emb_size
        mod = ref_fc(f.xyaffine, w)
        W = f.fourier_scale * mod[:, : 2 * e].view(B * T, e, 2)
        bias = mod[:, 2 * e:]
        mv = ref_fc(f.affine, torch.cat([w, zm], dim=1)).view(B * T, e, 1, 1)
        mv = F.leaky_relu(mv * Ts * f.sigma_t)
        mv = ref_fc(f.motion_mlp[1], ref_fc(f.motion_mlp[0], mv.view(B * T, e)))
        bias = (bias + mv).view(B * T, -1, 1, 1)
        raw = torch.einsum("bdc,bcxy->bdxy", W, ref_coords(B * T, n)) + bias
        return torch.cat([raw.sin(), raw.cos()], dim=1)

    def fmm(layer, x):
        styles = ref_fc(layer.affine, w)
        c_out, c_in, r = layer.out_channels, layer.in_channels, layer.rank
        left = styles[:, : c_out * r].view(B * T, c_out, r)
        right = styles[:, c_out * r:].view(B * T, r, c_in)
        W = layer.weight.unsqueeze(0) * (left @ right / np.sqrt(r) + 1.0)
        W = W / (W.norm(dim=2, keepdim=True) + 1e-8)
        n, h, wd = x.shape[0], x.shape[2], x.shape[3]
        out = torch.bmm(W, x.view(n, c_in, h * wd)).view(n, c_out, h, wd)
        return F.leaky_relu(out + layer.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def torgb(layer, x):
        styles = ref_fc(layer.affine, w) * layer.weight_gain
        Wm = layer.weight.unsqueeze(0) * styles.unsqueeze(1)
        return torch.einsum("boi,bihw->bohw", Wm, x) + layer.bias.view(1, -1, 1, 1)

    x = img = None
    for block in G.blocks.values():
        if block.kind == "first":
            x = fmm(block.conv1, fuser(block.coord_fuser, block.grid))
        elif block.kind == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, fuser(block.coord_fuser, block.grid)], dim=1)
            x = fmm(block.conv1, fmm(block.conv0, x))
        else:
            x = fmm(block.conv1, fmm(block.conv0, x))
        for layer in block.extra_convs:
            x = fmm(layer, x)
        if img is not None and block.kind == "up":
            img = F.interpolate(img, scale_factor=2, mode="nearest")
        y = torgb(block.torgb, x)
        img = y if img is None else img + y
    return img.view(B, T, 3, G.resolution, G.resolution)


def ref_upfirdn(x, pad, down):
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = (f[:, None] * f[None, :]) / 64
    x = F.pad(x, [pad] * 4)
    x = F.conv2d(x, f.flip([0, 1])[None, None].repeat(x.shape[1], 1, 1, 1), groups=x.shape[1])
    return x[:, :, ::down, ::down]


def ref_conv(layer, x, gain=1.0):
    w = layer.weight * layer.weight_gain
    if layer.down == 2 and layer.kernel_size > 1:
        x = F.conv2d(ref_upfirdn(x, 2, 1), w, stride=2)
    elif layer.down == 2:
        x = F.conv2d(ref_upfirdn(x, 1, 2), w)
    else:
        x = F.conv2d(x, w, padding=layer.kernel_size // 2)
    if layer.bias is not None:
        x = x + layer.bias.view(1, -1, 1, 1)
    if layer.activation == "lrelu":
        return F.leaky_relu(x, 0.2) * (math.sqrt(2) * gain)
    return x * gain


def ref_discriminator(D, img, c=None):
    x = None
    for block in D.blocks.values():
        if block.fromrgb is not None:
            x = ref_conv(block.fromrgb, img)
        y = ref_conv(block.skip, x, gain=math.sqrt(0.5))
        x = ref_conv(block.conv1, ref_conv(block.conv0, x), gain=math.sqrt(0.5))
        x = y + x
    ep = D.epilogue
    N, C, H, W = x.shape
    G = min(4, N)
    y = x.reshape(G, -1, 1, C, H, W)
    y = ((y - y.mean(dim=0)).square().mean(dim=0) + 1e-8).sqrt().mean(dim=[2, 3, 4])
    x = torch.cat([x, y.reshape(-1, 1, 1, 1).repeat(G, 1, H, W)], dim=1)
    x = ref_conv(ep.conv, x)
    x = ref_fc(ep.out, ref_fc(ep.fc, x.flatten(1)))
    if c is None:
        return x.squeeze(1)
    cmap = ref_mapping(D.mapping, None, c)  # official DiscriminatorEpilogue's projection
    return (x * cmap).sum(dim=1) / math.sqrt(cmap.shape[1])


# ----------------------------------------------------------------------------------------------------
# Shapes, dtypes, parameter counts.


@pytest.mark.parametrize("preset", ["demo-32", "demo-64"])
def test_shapes_and_dtypes_small_presets(preset):
    cfg = load_config(preset).model
    torch.manual_seed(0)
    G = build_generator(cfg)
    D_img, D_mot = build_discriminators(cfg)
    assert (G.z_dim, G.motion_z_dim, G.resolution) == (cfg.z_dim, cfg.motion_z_dim, cfg.resolution)
    B, T, r = 4, 3, cfg.resolution
    t = torch.rand(B, T)
    with torch.no_grad():
        frames = G(torch.randn(B, cfg.z_dim), torch.randn(B, cfg.motion_z_dim), t)
        assert frames.shape == (B, T, 3, r, r) and frames.dtype == torch.float32
        assert torch.isfinite(frames).all()
        logits = D_img(frames[:, :2].flatten(0, 1))
        assert logits.shape == (2 * B,) and logits.dtype == torch.float32
        x = motion_input(frames[:, :2], t[:, 1] - t[:, 0])
        assert x.shape == (B, 7, r, r)
        assert torch.equal(x[:, 6], (t[:, 1] - t[:, 0]).view(B, 1, 1).expand(B, r, r))
        logits = D_mot(x)
        assert logits.shape == (B,) and torch.isfinite(logits).all()


def test_digan128_parameter_parity_and_shapes():
    """The paper preset: parameter counts within 1 % of the official (here they match exactly)."""
    cfg = load_config("digan-128").model
    torch.manual_seed(0)
    G = build_generator(cfg)
    counts = {"G": num_params(G), "mapping": num_params(G.mapping),
              "fuser": num_params(G.blocks["b4"].coord_fuser)}
    for name, ref in [("G", OFFICIAL_G), ("mapping", OFFICIAL_MAPPING), ("fuser", OFFICIAL_COORD_FUSER)]:
        assert abs(counts[name] - ref) <= 0.01 * ref, (name, counts[name], ref)
    fusers = [b.coord_fuser for b in G.blocks.values() if b.coord_fuser is not None]
    assert [num_params(f) for f in fusers] == [OFFICIAL_COORD_FUSER] * 3  # grids 32, 64, 128
    assert [b.grid for b in G.blocks.values() if b.coord_fuser is not None] == [32, 64, 128]
    num_fmm = sum(1 + (b.conv0 is not None) + len(b.extra_convs) for b in G.blocks.values())
    assert num_fmm == 12
    with torch.no_grad():
        frames = G(torch.randn(1, 512), torch.randn(1, 512), torch.tensor([[0.5]]))
    assert frames.shape == (1, 1, 3, 128, 128) and frames.dtype == torch.float32
    del G
    D_img, D_mot = build_discriminators(cfg)
    n_img, n_mot = num_params(D_img), num_params(D_mot)
    assert abs(n_img + n_mot - OFFICIAL_D_TOTAL) <= 0.01 * OFFICIAL_D_TOTAL, (n_img, n_mot)
    assert abs(n_img - 28.39e6) < 0.01 * 28.39e6 and abs(n_mot - 28.39e6) < 0.01 * 28.39e6
    with torch.no_grad():
        logits = D_img(frames.flatten(0, 1))
        logits_m = D_mot(motion_input(frames.expand(1, 2, 3, 128, 128), torch.tensor([0.5])))
    assert logits.shape == (1,) and logits_m.shape == (1,)
    assert torch.isfinite(logits).all() and torch.isfinite(logits_m).all()


# ----------------------------------------------------------------------------------------------------
# Faithfulness: the optimised modules compute the official function.


def test_generator_matches_official_forward(small):
    cfg, G = small
    torch.manual_seed(1)
    z, zm = torch.randn(3, cfg.model.z_dim), torch.randn(3, cfg.model.motion_z_dim)
    t = torch.tensor([[0.0, 0.37, 1.0], [0.1, 0.2, 1.7], [0.9, 0.5, -0.3]])  # unsorted, t > 1 and t < 0 too
    with torch.no_grad():
        ours = G(z, zm, t)
        ref = ref_generator(G, z, zm, t)
    assert ref.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["image", "motion"])
def test_discriminator_matches_official_forward(which):
    cfg = load_config("demo-32").model
    torch.manual_seed(2)
    D = build_discriminators(cfg)[0 if which == "image" else 1]
    x = torch.randn(8, 3 if which == "image" else 7, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(D(x), ref_discriminator(D, x), rtol=1e-4, atol=1e-4)


def test_conditional_nets_match_the_official_forward_and_parameter_counts(small):
    """model.num_classes > 0: G's mapping embeds the label (StyleGAN2-ADA), both Ds project onto a mapped label
    embedding; the parameters the official conditional networks add, no more; a wrong label changes D's logit."""
    cfg = small_cfg(num_classes=3)
    torch.manual_seed(4)
    G = build_generator(cfg.model).eval()
    D_img, D_mot = build_discriminators(cfg.model)
    w, cm, C = cfg.model.w_dim, D_img.epilogue.in_channels, 3
    _, G0 = small
    D0 = build_discriminators(small[0].model)[0]
    assert num_params(G) - num_params(G0) == (C * w + w) + w * w  # embed, and fc0's wider input
    assert num_params(D_img) - num_params(D0) == (C * cm + cm) + 8 * (cm * cm + cm) + (cm - 1) * (cm + 1)
    z, zm, t = torch.randn(3, cfg.model.z_dim), torch.randn(3, cfg.model.motion_z_dim), torch.rand(3, 2)
    c = torch.tensor([0, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(G(z, zm, t, c=c), ref_generator(G, z, zm, t, c), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(G(z, zm, t, c=c), G(z, zm, t, c=(c + 1) % 3), atol=1e-3)
        x = torch.randn(4, 7, 32, 32)
        c4 = torch.tensor([0, 1, 2, 1])
        torch.testing.assert_close(D_mot(x, c4), ref_discriminator(D_mot, x, c4), rtol=1e-4, atol=1e-4)
        wrong = D_mot(x, (c4 + 1) % 3)
        assert ((wrong - D_mot(x, c4)).abs() > 1e-4).all()
        onehot = F.one_hot(c4, 3).float()  # class weights are accepted too
        torch.testing.assert_close(D_img(x[:, :3], onehot), D_img(x[:, :3], c4))
    with pytest.raises(ValueError, match="needs class labels"):
        D_img(x[:, :3])
    with pytest.raises(ValueError, match="unconditional"):
        G0(z, zm, t, c=c)
    with pytest.raises(ValueError, match=r"indices \[B\] in \[0, 3\)"):
        G(z, zm, t, c=torch.tensor([0, 3, 1]))


def test_discriminator_double_backward_for_r1():
    """R1 differentiates D's input gradient: check 1st and 2nd derivatives numerically (float64)."""
    cfg = load_config("demo-32", ["model.resolution=8", "model.input_resolution=4", "model.extra_conv_resolutions=[]",
                                  "model.d_channel_base=16", "model.d_channel_max=2"]).model
    torch.manual_seed(3)
    D = build_discriminators(cfg)[0].double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(D, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(D, (x,), fast_mode=True)


@pytest.mark.parametrize("shape,pad,stride", [((8, 8), 2, 1), ((8, 8), 1, 2), ((9, 7), 2, 1), ((9, 7), 1, 2)])
def test_fir_filter_matches_depthwise_conv_to_second_order(shape, pad, stride):
    """The hand-written FIR adjoint == autograd of the depthwise conv: values, 1st and 2nd derivatives,
    also on odd sizes where the transposed conv needs output padding."""
    torch.manual_seed(7)
    f = fir_filter_2d().double().expand(3, 1, 4, 4).contiguous()
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)

    def ref(x):
        return F.conv2d(x, f, stride=stride, padding=pad, groups=3)

    def ours(x):
        return fir_filter(x, f, pad, stride)

    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    assert torch.autograd.gradcheck(ours, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x: ours(x) ** 2, (x,), fast_mode=True)
    # R1-like: the gradient of a squared input-gradient norm, against autograd's own double backward
    g_ours = torch.autograd.grad((ours(x) ** 3).sum(), x, create_graph=True)[0]
    g_ref = torch.autograd.grad((ref(x) ** 3).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(g_ours, g_ref)
    torch.testing.assert_close(torch.autograd.grad(g_ours.square().sum(), x)[0],
                               torch.autograd.grad(g_ref.square().sum(), x)[0])


def test_winograd_conv_matches_direct_conv():
    """F(4x4, 3x3) Winograd == conv2d(padding=1): values, 1st and 2nd derivatives (R1 needs the 2nd)."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(conv3x3_winograd(x, w), F.conv2d(x, w, padding=1), rtol=1e-10, atol=1e-10)
    # 2 x 3 tiles of 2 images: the overlapping tile margins are summed in both directions
    x, w = x[:, :2].detach().requires_grad_(), w[:2, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(conv3x3_winograd, (x, w), fast_mode=True)
    assert torch.autograd.gradgradcheck(conv3x3_winograd, (x, w), fast_mode=True)
    # float32 at a D-like width: error of the order of F.conv2d's own
    x = torch.randn(2, 384, 16, 16)
    w = torch.randn(384, 384, 3, 3) / math.sqrt(384 * 9)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    err = (conv3x3_winograd(x, w).double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-4


def test_discriminator_with_winograd_layers_matches_official_and_r1():
    """A D wide enough (384 channels at 16x16) to take the Winograd path: same logits as the official
    forward, and the same R1 penalty and R1 weight gradients as with F.conv2d."""
    cfg = load_config("demo-32", ["model.resolution=16", "model.input_resolution=8", "model.extra_conv_resolutions=[]",
                                  "model.d_channel_base=6144", "model.d_channel_max=384"]).model
    torch.manual_seed(6)
    D = build_discriminators(cfg)[0]
    x = torch.randn(4, 3, 16, 16)
    wide = (torch.empty(4, 384, 16, 16), D.blocks["b16"].conv0.weight)
    assert not cpu_kernels.enabled() and not cpu_kernels.applies(*wide)  # off unless switched on
    cpu_kernels.enable()
    assert cpu_kernels.applies(*wide)
    cpu_kernels.enable(False)

    def r1(winograd: bool):
        cpu_kernels.enable(winograd)
        try:
            D.zero_grad()
            real = x.clone().requires_grad_(True)
            logits = D(real)
            (g,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
            penalty = g.square().sum([1, 2, 3]).mean()
            penalty.backward()
            # (the output bias does not reach the input gradient: its grad stays None)
            return logits.detach(), penalty.detach(), [p.grad for p in D.parameters() if p.grad is not None]
        finally:
            cpu_kernels.enable(False)

    with torch.no_grad():
        cpu_kernels.enable()
        try:
            torch.testing.assert_close(D(x), ref_discriminator(D, x), rtol=1e-4, atol=1e-4)
        finally:
            cpu_kernels.enable(False)
    (l_w, p_w, g_w), (l_d, p_d, g_d) = r1(True), r1(False)
    assert len(g_w) == len(g_d) == len(list(D.parameters())) - 1
    torch.testing.assert_close(l_w, l_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_w, p_d, rtol=1e-3, atol=1e-7)
    for a, b in zip(g_w, g_d):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3 * b.abs().max().item() + 1e-9)


def test_mapping_tracks_w_avg_only_in_training(small):
    cfg, _ = small
    G = build_generator(cfg.model)
    z, zm = torch.randn(4, cfg.model.z_dim), torch.randn(4, cfg.model.motion_z_dim)
    G.eval().prepare(z, zm)
    assert torch.count_nonzero(G.mapping.w_avg) == 0
    with torch.no_grad():
        w = G.mapping(z)  # eval mode: no update
        G.train().prepare(z, zm)
    torch.testing.assert_close(G.mapping.w_avg, 0.005 * w.mean(0))  # lerp(mean w, w_avg=0, beta=0.995)


# ----------------------------------------------------------------------------------------------------
# Rendering properties.


def test_same_seeds_give_bit_identical_videos(small):
    cfg, G = small
    t = torch.linspace(0, 1, 4)
    a = torch.cat([f for _, f in render_chunks(G, *seed_latents([3, 7], 128, 128), t)], 1)
    b = torch.cat([f for _, f in render_chunks(G, *seed_latents([3, 7], 128, 128), t)], 1)
    assert torch.equal(a, b)
    c = torch.cat([f for _, f in render_chunks(G, *seed_latents([4, 7], 128, 128), t)], 1)
    assert (a[0] - c[0]).abs().mean() > 0.1
    torch.testing.assert_close(a[1], c[1], rtol=0, atol=1e-6)  # a video does not depend on its batch mates


def test_frames_are_lipschitz_in_time(small):
    """|f(t + eps) - f(t)| <= C eps (phi(t) is piecewise linear in t), while distant frames differ.

    C = 20: the measured max slope of this untrained model is ~3 per unit t (5 at demo-64).
    """
    cfg, G = small
    z, zm = seed_latents([0, 1], cfg.model.z_dim, cfg.model.motion_z_dim)
    with torch.no_grad():
        code = G.prepare(z, zm)
        for t0 in (0.0, 0.3, 0.9):
            t = torch.tensor([[t0, t0 + 1e-3, t0 + 1e-4, t0 + 0.7]] * 2)
            f = G.render(code, t)
            near3, near4 = (f[:, 1] - f[:, 0]).abs(), (f[:, 2] - f[:, 0]).abs()
            far = (f[:, 3] - f[:, 0]).abs()
            assert near3.max() <= 20 * 1e-3
            assert near4.max() <= 20 * 1e-4
            assert 5 < near3.mean() / near4.mean() < 20  # shrinks linearly with eps
            assert far.mean() > 100 * near3.mean()


def test_motion_code_changes_motion_not_the_first_frame(small):
    """phi(0) = MLP(0) is independent of z_M: all motions of one content start from the same frame."""
    cfg, G = small
    z, zm = seed_latents([5, 5], cfg.model.z_dim, cfg.model.motion_z_dim, motion_seeds=[0, 1])
    assert torch.equal(z[0], z[1]) and not torch.equal(zm[0], zm[1])
    with torch.no_grad():
        f = G(z, zm, torch.tensor([[0.0, 1.0]] * 2))
    assert torch.equal(f[0, 0], f[1, 0])
    assert (f[0, 1] - f[1, 1]).abs().mean() > 0.05


def test_prepare_render_equals_forward_and_chunks_equal_one_shot(small):
    cfg, G = small
    z, zm = seed_latents([0, 1, 2], cfg.model.z_dim, cfg.model.motion_z_dim)
    t = torch.linspace(0, 1.5, 7)
    with torch.no_grad():
        full = G(z, zm, t.expand(3, -1))
        assert torch.equal(full, G.render(G.prepare(z, zm), t.expand(3, -1)))
    chunks = list(render_chunks(G, z, zm, t, chunk_frames=3))
    assert [start for start, _ in chunks] == [0, 3, 6] and [c.shape[1] for _, c in chunks] == [3, 3, 1]
    # frames are independent given the code: chunking only changes matmul blocking (float rounding)
    torch.testing.assert_close(torch.cat([c for _, c in chunks], 1), full, rtol=0, atol=1e-5)
    single = torch.cat([c for _, c in render_chunks(G, z, zm, t, chunk_frames=1)], 1)
    torch.testing.assert_close(single, full, rtol=0, atol=1e-5)


def test_super_resolution_reproduces_the_1x_frame(small):
    """Rendering at scale s evaluates every block on a grid s times denser (generate_coords(n * s)).

    Coordinates: x_j = 2j/n - 1, y_i = 2(n-1-i)/n - 1 (y flipped), so 1x pixel (i, j) sits at 2x pixel
    (2i + 1, 2j), the bottom-left sample of its 2x2 block. Every layer sees identical coordinates only on
    the lattice of 1x pixels whose low-resolution ancestors share them too: rows r*a + r - 1, columns
    r*b, with r = resolution / input_resolution (the nearest-upsampled trunk cells are anchored at
    their bottom-left pixel). There the 2x render equals the 1x render up to float rounding (1e-5).
    Elsewhere the 1x frame repeats the trunk feature of its cell while the 2x frame evaluates the trunk at
    a denser coordinate, so pixels agree only approximately (the genuine super-resolved signal): the
    mean error must stay well below the difference between two different videos.
    """
    cfg, G = small
    r = cfg.model.resolution // cfg.model.input_resolution
    z, zm = seed_latents([0, 1], cfg.model.z_dim, cfg.model.motion_z_dim)
    t = torch.tensor([[0.0, 0.6]] * 2)
    with torch.no_grad():
        code = G.prepare(z, zm)
        f1, f2 = G.render(code, t), G.render(code, t, scale=2)
        other = G(*seed_latents([8, 9], cfg.model.z_dim, cfg.model.motion_z_dim), t)
    assert f2.shape == (2, 2, 3, 2 * cfg.model.resolution, 2 * cfg.model.resolution)
    lattice_1x = f1[..., r - 1:: r, 0:: r]
    lattice_2x = f2[..., 2 * r - 1:: 2 * r, 0:: 2 * r]
    torch.testing.assert_close(lattice_2x, lattice_1x, rtol=0, atol=1e-5)
    # the other 2x2 positions do NOT line up exactly (shows the alignment above is the right one)
    assert (f2[..., 2 * r - 2:: 2 * r, 0:: 2 * r] - lattice_1x).abs().max() > 1e-2
    sub = f2[..., 1::2, 0::2]
    assert (sub - f1).abs().mean() < 0.4 * (other - f1).abs().mean()
    # scale 3 keeps the same lattice property (pixel (3i + 2, 3j))
    with torch.no_grad():
        f3 = G.render(code, t, scale=3)
    torch.testing.assert_close(f3[..., 3 * r - 1:: 3 * r, 0:: 3 * r], lattice_1x, rtol=0, atol=1e-5)


def test_supersampling_is_the_box_filtered_dense_render(small):
    """model.supersample=s renders every block on the s-times denser grid and averages each s x s block."""
    cfg, G = small
    G2 = build_generator(small_cfg(supersample=2).model).eval()
    G2.load_state_dict(G.state_dict())
    z, zm = seed_latents([0, 1], cfg.model.z_dim, cfg.model.motion_z_dim)
    t = torch.tensor([[0.0, 0.6]] * 2)
    with torch.no_grad():
        code = G.prepare(z, zm)
        dense, out = G.render(code, t, scale=2), G2.render(code, t)
        out2 = G2.render(code, t, scale=2)  # super-resolution stacks on it: scale 2 of a 2x-supersampled G
    side = cfg.model.resolution
    assert out.shape == (2, 2, 3, side, side) and out2.shape == (2, 2, 3, 2 * side, 2 * side)
    torch.testing.assert_close(out, F.avg_pool2d(dense.flatten(0, 1), 2).view_as(out), rtol=0, atol=1e-6)
    with torch.no_grad():
        dense4 = G.render(code, t, scale=4)
    torch.testing.assert_close(out2, F.avg_pool2d(dense4.flatten(0, 1), 2).view_as(out2), rtol=0, atol=1e-6)
    assert (out - G.render(code, t)).abs().mean() > 1e-3  # the filter does change the frames


def test_fourier_lr_mult_keeps_the_function_and_scales_the_frequency_steps():
    """model.fourier_lr_mult: same G at init (equalized lr), the frequency predictor's Adam steps scaled by it."""
    z, zm = seed_latents([0, 1, 2, 3], 128, 128)
    t = torch.tensor([[0.0, 0.5]] * 4)
    freqs = {}
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        G = build_generator(small_cfg(fourier_lr_mult=mult).model)
        fuser = G.blocks["b4"].coord_fuser
        before = fuser.prepare(G.mapping(z, None), zm)[0].detach()
        out = G(z, zm, t)
        opt = torch.optim.Adam(G.parameters(), lr=0.0025, betas=(0.0, 0.99))
        for _ in range(3):
            opt.zero_grad()
            G(z, zm, t).square().mean().backward()
            opt.step()
        after = fuser.prepare(G.mapping(z, None), zm)[0].detach()
        freqs[mult] = (before, out.detach(), (after - before).abs().mean())
    torch.testing.assert_close(freqs[0.1][0], freqs[1.0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(freqs[0.1][1], freqs[1.0][1], rtol=1e-4, atol=1e-4)
    ratio = float(freqs[0.1][2] / freqs[1.0][2])
    assert 0.05 < ratio < 0.2, ratio


# ----------------------------------------------------------------------------------------------------
# Errors and the export.


def test_bad_inputs_fail_clearly(small):
    cfg, G = small
    with pytest.raises(ValueError, match="z must be"):
        G(torch.randn(2, 7), torch.randn(2, 128), torch.rand(2, 2))
    with pytest.raises(ValueError, match="z_motion must be"):
        G(torch.randn(2, 128), torch.randn(3, 128), torch.rand(2, 2))
    with pytest.raises(ValueError, match="t must be"):
        G(torch.randn(2, 128), torch.randn(2, 128), torch.rand(3, 2))
    with pytest.raises(ValueError, match="scale"):
        G(torch.randn(2, 128), torch.randn(2, 128), torch.rand(2, 2), scale=0)
    D_img, _ = build_discriminators(cfg.model)
    with pytest.raises(ValueError, match="expects"):
        D_img(torch.randn(4, 7, 32, 32))
    with pytest.raises(ValueError, match="mbstd_group"):
        D_img(torch.randn(6, 3, 32, 32))


def test_generator_export_roundtrip(small, tmp_path):
    cfg, G = small
    run = tmp_path / "run"
    save_generator(run / "checkpoints" / "step-00000020", G, cfg, step=20, kimg=0.64)
    save_generator(run / "checkpoints" / "step-00000100" / "generator.pt", G, cfg, step=100, kimg=3.2)
    assert find_generator_file(run).parent.name == "step-00000100"
    assert find_generator_file(run / "checkpoints").parent.name == "step-00000100"
    assert not list(run.rglob("*.tmp"))  # the atomic write leaves no temp file behind
    payload = torch.load(find_generator_file(run), weights_only=True)
    assert payload["step"] == 100 and payload["kimg"] == pytest.approx(3.2)
    assert payload["config"]["model"]["extra_conv_resolutions"] == [32]
    G2, cfg2 = load_generator(run)
    assert cfg2 == cfg and not G2.training
    z, zm = seed_latents([0], cfg.model.z_dim, cfg.model.motion_z_dim)
    t = torch.tensor([[0.0, 0.5]])
    with torch.no_grad():
        assert torch.equal(G2(z, zm, t), G(z, zm, t))
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "missing")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable generator checkpoint"):
        load_generator(tmp_path / "junk.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 D blocks + conv_clamp)")
def test_discriminator_fp16_blocks_on_cuda():
    cfg = load_config("demo-64", ["model.d_fp16_resolutions=2"]).model
    torch.manual_seed(4)
    D = build_discriminators(cfg)[0]
    x = torch.randn(8, 3, 64, 64)
    ref = D(x)
    out = D.cuda()(x.cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, rtol=0.05, atol=0.05)
