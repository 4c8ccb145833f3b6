"""The recipe's maths on small real modules: R1 vs finite differences, EMA closed form, lazy-reg Adam
rescaling, DiffAugment properties, time sampling, and the step protocol (official phase order, one
backward per updater and phase, D frozen in G's step, the separate R1 schedule's 17 D steps per 16
iterations with the R1 gradient alone in its own step)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from digan.config import ConfigError, LossConfig, OptimConfig, load_config
from digan.training import (EMA, DIGANLoss, DiffAugment, DiscriminatorPair, PlainUpdater, SingleProcessTrainer,
                            adam_kwargs, build_adam, d_reg_interval, d_step, frozen, g_step, motion_input,
                            random_xflip, sample_time_pairs, sanitize_grads_, stats_to_floats, train_step)
from digan.training.augment import rand_translation


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: one intra-op thread (conftest)


# ----------------------------------------------------------------------------------------------------
# Small real modules with the model API (smooth activations so finite differences are accurate).


class TinyG(nn.Module):
    def __init__(self, res: int = 8, z_dim: int = 4, motion_z_dim: int = 3):
        super().__init__()
        self.z_dim, self.motion_z_dim, self.resolution = z_dim, motion_z_dim, res
        self.fc = nn.Linear(z_dim + motion_z_dim + 1, 3 * res * res)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, z, z_M, t):
        b, n = t.shape
        h = torch.cat([z[:, None].expand(b, n, -1), z_M[:, None].expand(b, n, -1), t[..., None]], dim=-1)
        return torch.tanh(self.fc(h)).view(b, n, 3, self.resolution, self.resolution)


class TinyD(nn.Module):
    def __init__(self, in_channels: int, res: int = 8):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * (res // 2) ** 2, 1)

    def forward(self, x):
        x = torch.tanh(self.conv0(x))
        x = F.softplus(self.conv1(x))
        return self.fc(x.flatten(1)).squeeze(1)


def tiny_nets(res=8, dtype=torch.float32):
    torch.manual_seed(0)
    return TinyG(res).to(dtype), TinyD(3, res).to(dtype), TinyD(7, res).to(dtype)


def fixed_augment(policy="color,translation", seed=3):
    """DiffAugment with the same random parameters on every call (re-seeded generator; keyed rows ignored)."""
    aug = DiffAugment(policy, translation_ratio=0.25)
    return lambda pair, rows=None: aug(pair, generator=torch.Generator().manual_seed(seed))


def finite_diff_grad(f, x, h=1e-5):
    """Central differences of the scalar f at x (float64), all coordinates at once as one batch."""
    flat = x.detach().flatten()
    eye = torch.eye(flat.numel(), dtype=x.dtype) * h
    xs_plus = (flat + eye).view(-1, *x.shape[1:])
    xs_minus = (flat - eye).view(-1, *x.shape[1:])
    return ((f(xs_plus) - f(xs_minus)) / (2 * h)).view_as(x)


# ----------------------------------------------------------------------------------------------------
# R1


@pytest.mark.parametrize("policy", ["", "color,translation"])
def test_r1_matches_finite_differences(policy):
    """D_M's penalty is w.r.t. the un-augmented 7-channel input (through the augmentation), D_I's w.r.t. the
    augmented frames; both match central differences; the lazy term is interval * gamma/2 * sum."""
    G, D_img, D_mot = tiny_nets(res=4, dtype=torch.float64)
    loss = DIGANLoss(r1_gamma=0.7, r1_interval=5, xflip=False, augment=fixed_augment(policy))
    real_pair = torch.rand(1, 2, 3, 4, 4, dtype=torch.float64) * 2 - 1  # one pair: FD below is per pair
    real_dt = torch.tensor([0.4], dtype=torch.float64)
    total, stats = loss.d_loss(G, D_img, D_mot, real_pair, real_dt, do_r1=True)

    # D_M o augment, as a function of the raw 7-channel input x (batch of perturbed copies, each of N=1).
    x = motion_input(real_pair, real_dt)
    aug = fixed_augment(policy)

    def f_M(xs):  # augment each copy with the same parameters (N=1 calls), score all at once
        pairs = torch.cat([aug(xi[:, :6].unflatten(1, (2, 3))) for xi in xs.split(1)])
        return D_mot(torch.cat([pairs.flatten(1, 2), xs[:, 6:]], dim=1))

    g_M = finite_diff_grad(f_M, x)
    assert g_M[:, 6].abs().sum() > 0  # the Δt plane is part of the R1 input
    frames_aug = aug(real_pair).flatten(0, 1)  # [2, 3, H, W], what D_I saw
    g_I = torch.cat([finite_diff_grad(D_img, fr[None]) for fr in frames_aug])

    r1_M = g_M.square().sum()
    r1_I = g_I.square().flatten(1).sum(1).mean()
    torch.testing.assert_close(stats["r1_penalty_M"], r1_M, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats["r1_penalty_I"], r1_I, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats["r1"], 0.35 * (r1_M + r1_I), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(total - stats["loss_D"], 5 * stats["r1"].to(total.dtype), rtol=1e-6, atol=1e-9)
    # The separate schedule's R1 loss (its own forward of the reals): the same penalty, alone, x interval.
    r1_total, r1_stats = loss.r1_loss(D_img, D_mot, real_pair, real_dt)
    torch.testing.assert_close(r1_stats["r1"], 0.35 * (r1_M + r1_I), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(r1_total, 5 * r1_stats["r1"].to(r1_total.dtype), rtol=1e-6, atol=1e-9)


def test_r1_off_step_has_no_penalty_and_gradient_reaches_D():
    G, D_img, D_mot = tiny_nets()
    loss = DIGANLoss(r1_gamma=1.0, r1_interval=4)
    assert [loss.r1_due(s) for s in range(9)] == [True, False, False, False, True, False, False, False, True]
    assert not DIGANLoss(r1_gamma=0.0, r1_interval=4).r1_due(0)
    assert not DIGANLoss(r1_gamma=1.0, r1_interval=0).r1_due(0)
    total, stats = loss.d_loss(G, D_img, D_mot, torch.rand(4, 2, 3, 8, 8) * 2 - 1, torch.rand(4), do_r1=False)
    assert "r1" not in stats and torch.equal(total.detach(), stats["loss_D"])


def test_r1_term_reaches_D_parameters():
    """The penalty must be built with create_graph, else lazy R1 changes nothing in D's update."""
    G, D_img, D_mot = tiny_nets()
    loss = DIGANLoss(r1_gamma=1.0, r1_interval=1, xflip=False)
    real, dt = torch.rand(2, 2, 3, 8, 8) * 2 - 1, torch.rand(2)
    grads = []
    for do_r1 in (False, True):
        torch.manual_seed(1)  # same fake batch and augmentation in both calls
        total, _ = loss.d_loss(G, D_img, D_mot, real, dt, do_r1)
        grads.append(torch.autograd.grad(total, list(D_img.parameters()) + list(D_mot.parameters())))
    for g0, g1 in zip(*grads):
        assert torch.isfinite(g1).all()
    assert any(not torch.allclose(g0, g1) for g0, g1 in zip(*grads))


# ----------------------------------------------------------------------------------------------------
# EMA


class Scalar(nn.Module):
    def __init__(self, value=0.0):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(value), dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0))


def test_ema_closed_form_with_rampup():
    batch, ema_kimg, rampup = 32, 2.0, 0.05
    G, G_ema = Scalar(), Scalar()
    ema = EMA(G_ema, batch_size=batch, ema_kimg=ema_kimg, ema_rampup=rampup)
    values = [math.sin(0.37 * k) + 0.01 * k for k in range(60)]
    for k, v in enumerate(values):
        with torch.no_grad():
            G.p.fill_(v)
            G.count.fill_(k)
        ema.update(G, cur_nimg=k * batch)

    # Closed form: ema_K = sum_k v_k (1 - b_k) prod_{j>k} b_j with b_k = 0.5 ** (batch / min(2000, 0.05 * k * 32)).
    betas = [0.0 if k == 0 else 0.5 ** (batch / min(ema_kimg * 1000, rampup * k * batch)) for k in range(len(values))]
    expected = sum(v * (1 - betas[k]) * math.prod(betas[k + 1:]) for k, v in enumerate(values))
    assert abs(G_ema.p.item() - expected) < 1e-12
    assert G_ema.count.item() == len(values) - 1  # buffers are copied
    # Ramp-up dominates early (0.05 * 1600 = 80 images), the half-life later.
    assert ema.beta(0) == 0.0
    assert ema.beta(1600) == pytest.approx(0.5 ** (32 / 80))
    assert ema.beta(10**7) == pytest.approx(0.5 ** (32 / 2000))


def test_ema_half_life_and_default():
    # Without ramp-up: after half_life images of a constant 1 the EMA has covered exactly half the gap.
    G, G_ema = Scalar(1.0), Scalar(0.0)
    ema = EMA(G_ema, batch_size=10, ema_kimg=0.1, ema_rampup=None)  # half-life 100 images = 10 steps
    for k in range(10):
        ema.update(G, cur_nimg=10 * k)
    assert G_ema.p.item() == pytest.approx(0.5, abs=1e-12)
    # Official default half-life: batch * 10 / 32 kimg (20 kimg at batch 64).
    assert EMA(Scalar(), batch_size=64).ema_kimg == 20.0
    assert EMA(Scalar(), batch_size=64).beta(10**9) == pytest.approx(0.5 ** (64 / 20000))
    # First update copies G exactly; state_dict round-trips.
    ema2 = EMA(Scalar(5.0), batch_size=64)
    ema2.update(Scalar(-3.0), cur_nimg=0)
    assert ema2.module.p.item() == -3.0
    other = EMA(Scalar(0.0), batch_size=64)
    other.load_state_dict(ema2.state_dict())
    assert other.module.p.item() == -3.0


# ----------------------------------------------------------------------------------------------------
# Adam and the lazy-regularisation rescaling (official numbers)


def test_adam_lazy_reg_rescaling_matches_reference():
    cfg = load_config("digan-128").optim
    g = adam_kwargs(cfg, 4)
    d = adam_kwargs(cfg, 16)
    assert g["lr"] == pytest.approx(0.002)
    # Official DIGAN (StyleGAN2-ADA lazy-reg rescaling): G lr 0.0020, β2 ≈ 0.9920; D lr ≈ 0.00235, β2 ≈ 0.9906.
    assert g["betas"] == (0.0, pytest.approx(0.99 ** 0.8)) and g["betas"][1] == pytest.approx(0.9920, abs=5e-5)
    assert d["lr"] == pytest.approx(0.0025 * 16 / 17) and d["lr"] == pytest.approx(0.00235, abs=5e-6)
    assert d["betas"] == (0.0, pytest.approx(0.99 ** (16 / 17))) and d["betas"][1] == pytest.approx(0.9906, abs=5e-5)
    assert g["eps"] == d["eps"] == 1e-8
    assert adam_kwargs(OptimConfig(lr=0.01), 0) == {"lr": 0.01, "betas": (0.0, 0.99), "eps": 1e-8}
    # D's rescaling follows the R1 schedule: separate (official) 16/17, folded none (one D step per iteration).
    assert d_reg_interval(LossConfig(r1_interval=16)) == 16
    assert d_reg_interval(LossConfig(r1_interval=16, r1_schedule="folded")) == 0
    opt = build_adam(nn.Linear(2, 2).parameters(), cfg, 16)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025 * 16 / 17)
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (16 / 17))


def test_nonfinite_gradients_are_zeroed_and_clamped():
    lin = nn.Linear(3, 1, bias=False)
    lin.weight.grad = torch.tensor([[float("nan"), float("inf"), -3e7]])
    sanitize_grads_(lin.parameters(), 1e5)
    assert lin.weight.grad.tolist() == [[0.0, 1e5, -1e5]]
    # Through the updater: a NaN gradient leaves the weight unchanged instead of poisoning it.
    before = lin.weight.detach().clone()
    up = PlainUpdater(lin, torch.optim.Adam(lin.parameters(), lr=0.1, betas=(0.0, 0.99)), grad_clamp=1e5)
    up.zero_grad()
    up.backward(lin(torch.ones(1, 3)).sum() * float("nan"))
    up.step()
    assert torch.isfinite(lin.weight).all() and torch.equal(lin.weight.detach(), before)


# ----------------------------------------------------------------------------------------------------
# DiffAugment


def test_diffaugment_same_params_for_both_frames():
    aug = DiffAugment("color,translation,cutout", translation_ratio=0.25)
    frame = torch.rand(16, 1, 3, 12, 12) * 2 - 1
    out = aug(frame.expand(16, 2, 3, 12, 12).contiguous())
    assert torch.equal(out[:, 0], out[:, 1])  # identical frames in -> identical frames out
    assert not torch.allclose(out[0], out[1])  # but different pairs get different parameters


def test_diffaugment_is_differentiable_twice():
    x = torch.rand(2, 2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    aug = fixed_augment("color,translation,cutout", seed=1)
    assert torch.autograd.gradcheck(aug, (x,))
    assert torch.autograd.gradgradcheck(aug, (x,))


def test_translation_zero_pads_and_moves_content():
    n, h, w, ratio = 64, 16, 16, 0.125
    ones = torch.ones(n, 2, 3, h, w)
    gen = torch.Generator().manual_seed(0)
    out = rand_translation(ones, ratio, generator=gen)
    kept_rows = out[:, 0, 0].amax(dim=2).sum(dim=1)  # rows that still hold content
    kept_cols = out[:, 0, 0].amax(dim=1).sum(dim=1)
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # zero padding, no interpolation
    assert ((h - kept_rows) <= 2).all() and ((w - kept_cols) <= 2).all()  # |shift| <= round(0.125 * 16) = 2
    assert (kept_rows < h).any() and (kept_cols < w).any()  # some pairs were shifted
    # Each sample is an exact rectangle of ones: (kept_rows x kept_cols).
    assert torch.equal(out[:, 0, 0].sum(dim=(1, 2)), kept_rows * kept_cols)
    # A single bright pixel moves by the same integer offset in both frames and keeps its value.
    img = torch.zeros(n, 2, 3, h, w)
    img[:, :, :, 8, 8] = 1.0
    moved = rand_translation(img, ratio, generator=torch.Generator().manual_seed(1))
    pos = moved[:, :, 0].flatten(2).argmax(dim=2)
    assert torch.equal(pos[:, 0], pos[:, 1]) and torch.equal(moved.sum(dim=(2, 3, 4)), torch.full((n, 2), 3.0))


def test_delta_t_plane_is_not_augmented():
    seen = {}

    class Recorder(TinyD):
        def forward(self, x):
            seen["x"] = x
            return super().forward(x)

    torch.manual_seed(0)
    D_mot, D_img = Recorder(7), TinyD(3)
    loss = DIGANLoss(diffaug_policy="color,translation", translation_ratio=0.25)
    dt = torch.tensor([0.0, 1 / 15, 0.5, 1.0])
    pair = torch.rand(4, 2, 3, 8, 8) * 2 - 1
    loss.run_D(D_img, D_mot, motion_input(pair, dt))
    assert torch.equal(seen["x"][:, 6], dt.view(4, 1, 1).expand(4, 8, 8))
    assert not torch.allclose(seen["x"][:, :6], pair.flatten(1, 2))  # while the frames are augmented


def test_xflip_flips_both_frames():
    pair = torch.rand(64, 2, 3, 4, 5)
    out = random_xflip(pair, generator=torch.Generator().manual_seed(0))
    flipped = (out != pair).flatten(2).any(2)  # [N, 2]
    assert torch.equal(flipped[:, 0], flipped[:, 1]) and 10 < flipped[:, 0].sum() < 54
    assert torch.equal(out[flipped[:, 0]], pair[flipped[:, 0]].flip(-1))


# ----------------------------------------------------------------------------------------------------
# Time sampling


def test_time_pair_statistics():
    t = sample_time_pairs(200_000, generator=torch.Generator().manual_seed(0))
    dt = t[:, 1] - t[:, 0]
    assert t.shape == (200_000, 2) and (t >= 0).all() and (t <= 1).all() and (dt >= 0).all()
    assert abs(dt.mean().item() - 0.40) < 0.005  # E|u1 - u2| = 0.4 exactly for Beta(2,1) vs Beta(1,2)
    assert abs(dt.median().item() - 0.38) < 0.01
    assert abs(t[:, 1].mean().item() - 0.70) < 0.01 and abs(t[:, 0].mean().item() - 0.30) < 0.01  # E max = 0.7
    same = sample_time_pairs(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, sample_time_pairs(5, generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------------------------------
# The step protocol (what DeepSpeed engines need)


class CountingUpdater(PlainUpdater):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backwards = self.steps = 0

    def backward(self, loss):
        self.backwards += 1
        super().backward(loss)

    def step(self):
        self.steps += 1
        super().step()


def test_train_step_protocol():
    G, D_img, D_mot = tiny_nets()
    D = DiscriminatorPair(D_img, D_mot)
    g_up = CountingUpdater(G, torch.optim.Adam(G.parameters(), lr=1e-3))
    d_up = CountingUpdater(D, torch.optim.Adam(D.parameters(), lr=1e-3))
    ema = EMA(TinyG(8), batch_size=4, ema_kimg=0.01)
    loss = DIGANLoss(r1_gamma=1.0, r1_interval=2)
    assert loss.r1_schedule == "separate"  # the default
    real = torch.rand(4, 2, 3, 8, 8) * 2 - 1

    # D step: G receives no gradient.
    d_step(G, D_img, D_mot, d_up, loss, real, torch.rand(4), do_r1=True)
    assert all(p.grad is None for p in G.parameters()) and all(p.grad is not None for p in D.parameters())
    # G step: D is frozen during it (no gradient left in D) and unfrozen afterwards.
    d_up.zero_grad()
    D_img.conv0.bias.requires_grad_(False)  # a deliberately frozen parameter stays frozen
    g_step(G, D_img, D_mot, g_up, loss, 4)
    assert all(p.grad is None for p in D.parameters())
    assert all(p.grad is not None for p in G.parameters())
    assert not D_img.conv0.bias.requires_grad and D_img.conv0.weight.requires_grad
    D_img.conv0.bias.requires_grad_(True)
    with frozen(D_img):
        assert not any(p.requires_grad for p in D_img.parameters())

    for schedule, d_calls in [("separate", 6), ("folded", 4)]:
        loss.r1_schedule = schedule
        g_up.backwards = g_up.steps = d_up.backwards = d_up.steps = 0
        history = []
        for step in range(4):
            w_before = D_mot.fc.weight.detach().clone()
            stats = train_step(G, D_img, D_mot, g_up, d_up, loss, ema, real, torch.rand(4), step, cur_nimg=4 * step)
            history.append(stats_to_floats(stats))
            assert not torch.equal(w_before, D_mot.fc.weight)
        # one backward per step() and phase: G 1 per iteration; D 1, plus its R1 step on R1 iterations (separate)
        assert (g_up.backwards, g_up.steps, d_up.backwards, d_up.steps) == (4, 4, d_calls, d_calls), schedule
        assert ["r1" in h for h in history] == [True, False, True, False]
        assert [h["d_steps"] for h in history] == ([2, 1, 2, 1] if schedule == "separate" else [1, 1, 1, 1])
        assert [h["kimg"] for h in history] == pytest.approx([0.004, 0.008, 0.012, 0.016])
        assert history[0]["ema_beta"] == 0.0
        for key in ("loss_G", "loss_D", "D_M_real", "D_M_fake", "D_I_real", "D_I_fake"):
            assert all(math.isfinite(h[key]) for h in history)


def test_r1_schedule_config_key():
    assert load_config("demo-32").loss.r1_schedule == "separate"
    assert load_config("demo-32", ["loss.r1_schedule=folded"]).loss.r1_schedule == "folded"
    with pytest.raises(ConfigError, match=r"^loss\.r1_schedule='both': choose from separate, folded$"):
        load_config("demo-32", ["loss.r1_schedule=both"])
    with pytest.raises(ValueError, match="r1_schedule"):
        DIGANLoss(r1_schedule="both")


class PhaseRecorder(DIGANLoss):
    """Records, in call order, every latent draw (z) and every augmentation draw (its parameters)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events = []
        aug = DiffAugment("color,translation", translation_ratio=0.25)

        def augment(pair, rows=None):
            params = aug.sample(pair, rows=rows)
            self.events.append(("augment", params))
            return aug.apply(pair, params)

        self.augment = augment

    def sample_latents(self, G, batch_size):
        z, z_M, t = super().sample_latents(G, batch_size)
        self.events.append(("latents", (z, z_M, t)))
        return z, z_M, t


def test_official_phase_order_and_fresh_draws_per_phase():
    """Gmain, Dmain, Dreg in that order; each phase renders its own fresh latents and draws its own
    augmentation (the official loop: a z chunk per phase, Ts and z_motion drawn in every run_G, one
    DiffAugment draw per run_D). xflip is drawn once per iteration: both D steps see the same reals."""
    G, D_img, D_mot = tiny_nets()
    D = DiscriminatorPair(D_img, D_mot)
    loss = PhaseRecorder(r1_gamma=1.0, r1_interval=2, xflip=True)
    g_up = PlainUpdater(G, torch.optim.Adam(G.parameters(), lr=1e-3))
    d_up = PlainUpdater(D, torch.optim.Adam(D.parameters(), lr=1e-3))
    ema = EMA(TinyG(8), batch_size=4, ema_kimg=0.01)
    reals_seen = []
    run_D = loss.run_D

    def spy_run_D(D_img_, D_mot_, x, labels=None):
        reals_seen.append(x.detach().clone())
        return run_D(D_img_, D_mot_, x, labels)

    loss.run_D = spy_run_D
    real = torch.rand(8, 2, 3, 8, 8) * 2 - 1
    train_step(G, D_img, D_mot, g_up, d_up, loss, ema, real, torch.rand(8), step=0, cur_nimg=0)
    kinds = [k for k, _ in loss.events]
    # G: latents, D(fake); D: latents, D(fake), D(real); R1: D(real)
    assert kinds == ["latents", "augment", "latents", "augment", "augment", "augment"]
    z_g, z_d = loss.events[0][1], loss.events[2][1]
    assert all(not torch.equal(a, b) for a, b in zip(z_g, z_d))  # fresh z, z_M and t for D's phase
    augs = [p for k, p in loss.events if k == "augment"]
    for i in range(len(augs)):
        for j in range(i):
            assert not torch.equal(augs[i]["brightness"], augs[j]["brightness"])  # own draw per forward
    # the real forwards of D's step and of its R1 step see the same (flipped) reals
    torch.testing.assert_close(reals_seen[2], reals_seen[3], rtol=0, atol=0)
    loss.events.clear()
    train_step(G, D_img, D_mot, g_up, d_up, loss, ema, real, torch.rand(8), step=1, cur_nimg=8)
    assert [k for k, _ in loss.events] == ["latents", "augment", "latents", "augment", "augment"]  # no R1


def _adam_steps(opt: torch.optim.Optimizer) -> int:
    """Optimizer steps taken, from Adam's own per-parameter state (the most any parameter took)."""
    return max(int(st["step"]) for st in opt.state.values())


@pytest.mark.parametrize("schedule, d_steps", [("separate", 17), ("folded", 16)])
def test_d_takes_the_official_number_of_optimizer_steps(schedule, d_steps):
    """Official lazy R1 at interval 16: Dmain every iteration plus Dreg on iterations 0, 16, ... = 17 D
    steps per 16 iterations, G 16 (its Greg step is empty: pl_weight = 0). Counted by Adam itself;
    the D optimizer's lr/betas carry the 16/17 rescaling only in the separate schedule."""
    cfg = load_config("demo-32", ["model.resolution=8", "model.input_resolution=4", "model.channel_max=8",
                                  "model.d_channel_max=8", "model.z_dim=8", "model.w_dim=8", "model.motion_z_dim=8",
                                  "model.coord_emb_size=4", "train.batch_size=2", "model.mbstd_group=2",
                                  "loss.r1_interval=16", "loss.r1_gamma=1.0", f"loss.r1_schedule={schedule}"])
    trainer = SingleProcessTrainer(cfg, seed=0)
    real = torch.rand(2, 2, 3, 8, 8) * 2 - 1
    for _ in range(16):
        trainer.train_step(real, torch.rand(2))
    assert _adam_steps(trainer.d_updater.optimizer) == d_steps
    assert _adam_steps(trainer.g_updater.optimizer) == 16
    # every D parameter takes every step, also the output biases whose R1 gradient is zero (official)
    assert {int(st["step"]) for st in trainer.d_updater.optimizer.state.values()} == {d_steps}
    r = 16 / 17 if schedule == "separate" else 1.0
    group = trainer.d_updater.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(cfg.optim.lr * r) and group["betas"][1] == pytest.approx(0.99 ** r)
    trainer.train_step(real, torch.rand(2))  # iteration 16: the next R1 iteration
    assert _adam_steps(trainer.d_updater.optimizer) == d_steps + (2 if schedule == "separate" else 1)


class GradCapture(PlainUpdater):
    """Keeps a copy of every step's gradients and of the weights they were taken at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self):
        self.seen.append(([p.grad.detach().clone() if p.grad is not None else None for p in self.module.parameters()],
                          [p.detach().clone() for p in self.module.parameters()]))
        super().step()


def test_separate_r1_step_applies_the_x16_penalty_alone():
    """The R1 step's gradient is exactly that of 16 * gamma/2 * (E|grad_x D_M|^2 + E|grad_y D_I|^2) at D's
    weights after its main step: no adversarial term in it, and the main step has no R1 term."""
    G, D_img, D_mot = tiny_nets()
    D = DiscriminatorPair(D_img, D_mot)
    gamma, interval = 0.3, 16
    aug = fixed_augment()
    loss = DIGANLoss(r1_gamma=gamma, r1_interval=interval, xflip=False, augment=aug)
    g_up = PlainUpdater(G, torch.optim.Adam(G.parameters(), lr=1e-3))
    d_up = GradCapture(D, torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99)))
    ema = EMA(TinyG(8), batch_size=4, ema_kimg=0.01)
    real, dt = torch.rand(4, 2, 3, 8, 8) * 2 - 1, torch.rand(4)
    torch.manual_seed(5)
    train_step(G, D_img, D_mot, g_up, d_up, loss, ema, real, dt, step=0, cur_nimg=0)
    assert len(d_up.seen) == 2
    (main_grads, main_weights), (r1_grads, r1_weights) = d_up.seen

    def r1_reference(weights):
        """An independent transcription of the official Dreg loss (loss.py, phase Dreg) on a copy of D."""
        D_ref = DiscriminatorPair(TinyD(3), TinyD(7))
        with torch.no_grad():
            for p, w in zip(D_ref.parameters(), weights):
                p.copy_(w)
        x = motion_input(real, dt).detach().requires_grad_(True)
        pair = aug(x[:, :6].unflatten(1, (2, 3)))
        logits_M = D_ref.mot(torch.cat([pair.flatten(1, 2), x[:, 6:]], dim=1))
        frames = pair.flatten(0, 1)
        logits_I = D_ref.img(frames)
        (g_M,) = torch.autograd.grad(logits_M.sum(), x, create_graph=True)
        (g_I,) = torch.autograd.grad(logits_I.sum(), frames, create_graph=True)
        penalty = ((g_M.square().sum([1, 2, 3]) * (gamma / 2)).mean()
                   + (g_I.square().sum([1, 2, 3]) * (gamma / 2)).mean())
        return torch.autograd.grad(penalty * interval, list(D_ref.parameters()), allow_unused=True)

    # the R1 step ran at the weights the main step left (its own step, after the main one)
    assert any(not torch.equal(a, b) for a, b in zip(main_weights, r1_weights))
    for got, want in zip(r1_grads, r1_reference(r1_weights)):
        if want is None:  # the output biases: R1 does not depend on them; a zero gradient, as official
            assert got is not None and torch.equal(got, torch.zeros_like(got))
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # and the main step's gradient is not that (nor does it contain it: it is the adversarial one)
    for got, want in zip(main_grads, r1_reference(main_weights)):
        assert got is not None and (want is None or not torch.allclose(got, want))


# ----------------------------------------------------------------------------------------------------
# Adaptive augmentation (loss.ada_target; StyleGAN2-ADA's geometric pipeline and p heuristic).


def test_ada_off_is_the_identity_and_untouched_pairs_stay_bit_exact():
    from digan.training import AdaptiveAugment

    x = torch.randn(64, 2, 3, 8, 8)
    assert AdaptiveAugment(0.0)(x) is x
    ada = AdaptiveAugment(0.2)
    _, changed = ada.matrices(64, 8, torch.Generator().manual_seed(5))
    y = ada(x, torch.Generator().manual_seed(5))
    assert 0 < int(changed.sum()) < 64  # at p = 0.2 some pairs draw no op at all
    assert torch.equal(y[~changed], x[~changed])
    assert (y[changed] - x[changed]).flatten(1).abs().amax(1).min() > 1e-3


def test_ada_moves_both_frames_of_a_pair_alike_and_is_differentiable_twice():
    from digan.training import AdaptiveAugment

    frame = torch.randn(16, 1, 3, 8, 8)
    y = AdaptiveAugment(1.0)(frame.expand(16, 2, 3, 8, 8).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(y[:, 0], y[:, 1])
    x = torch.randn(4, 2, 3, 8, 8, requires_grad=True)
    w = torch.randn(2 * 3, requires_grad=True)
    out = (AdaptiveAugment(1.0)(x).flatten(1, 2) * w.view(1, -1, 1, 1)).square().sum()
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    g.square().sum().backward()  # R1's second derivative through the augmentation
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_ada_op_frequencies_follow_p():
    """Each op fires with probability p (rotations 1 - sqrt(1 - p)): a pair is untouched with probability
    (1 - p)^6 (1 - p) (six ops at p, two rotations at 1 - sqrt(1 - p))."""
    from digan.training import AdaptiveAugment

    for p in (0.1, 0.5):
        _, changed = AdaptiveAugment(p).matrices(20000, 32, torch.Generator().manual_seed(1))
        expected = 1 - (1 - p) ** 7
        assert float(changed.float().mean()) == pytest.approx(expected, abs=0.015)


def test_ada_tuner_follows_the_official_heuristic():
    from digan.training import AdaTuner

    t = AdaTuner(target=0.6, kimg=1.0, interval=4, batch_size=16)
    ps = []
    for step in range(1, 25):
        t.observe(torch.tensor(0.9 if step <= 12 else 0.1))  # D overfits, then it does not
        if t.due(step):
            ps.append(t.adjust(t.local_mean()))
    step = 16 * 4 / 1000  # batch * interval / (kimg * 1000)
    assert ps == pytest.approx([step, 2 * step, 3 * step, 2 * step, step, 0.0])
    t.adjust(-1.0)
    assert t.p == 0.0  # never below 0
    t2 = AdaTuner(0.6, 1.0, 4, 16)
    t.observe(0.7)
    t2.load_state_dict(t.state_dict())
    assert t2.state_dict() == t.state_dict()


def test_ada_in_training_moves_p_and_its_state_travels():
    """A run with loss.ada_target: p moves by whole heuristic steps and is reported; a trainer restored from a
    mid-interval state_dict has the same p and the open interval's sum (the default stays off)."""
    over = ["model.resolution=8", "model.input_resolution=4", "model.channel_max=8", "model.d_channel_max=8",
            "model.z_dim=8", "model.w_dim=8", "model.motion_z_dim=8", "model.coord_emb_size=4", "train.batch_size=2",
            "model.mbstd_group=2", "loss.ada_target=0.05", "loss.ada_kimg=0.1", "loss.ada_interval=2"]
    cfg = load_config("demo-32", over)
    with pytest.raises(ConfigError, match="loss.ada_target"):
        load_config("demo-32", ["loss.ada_target=1.5"])
    real = torch.rand(2, 2, 3, 8, 8) * 2 - 1
    a = SingleProcessTrainer(cfg, seed=0)
    assert a.loss.ada is not None and a.loss.ada.p == 0.0
    for _ in range(3):
        a.train_step(real, torch.rand(2))
    state = {k: v for k, v in a.state_dict().items()}
    ps_a = []
    for _ in range(5):
        stats = a.train_step(real, torch.rand(2))
        ps_a.append(a.loss.ada.p)
    assert "signs_real" in stats and "ada_p" in stats
    assert all(abs(p / 0.02 - round(p / 0.02)) < 1e-9 for p in ps_a)  # whole steps of 2 * 2 / 100
    assert max(ps_a) > 0
    b = SingleProcessTrainer(cfg, seed=0)
    b.load_state_dict(state)
    assert b.loss.ada.p == state["ada"]["p"] and b.ada.count == 1  # the open interval travels too
    assert load_config("demo-32").loss.ada_target == 0.0 and DIGANLoss.from_config(load_config("demo-32").loss).ada is None


def test_one_process_draws_the_fakes_that_ranks_draw():
    """The single-process trainer's fakes come from the keyed latents the distributed ranks use: the rows
    a rank holding global samples [2, 4) draws are rows 2-3 of the one process's draw, step by step."""
    from digan.training.latents import KeyedLatents

    cfg = load_config("demo-32", ["model.resolution=8", "model.input_resolution=4", "model.channel_max=8",
                                  "model.d_channel_max=8", "model.z_dim=8", "model.w_dim=8", "model.motion_z_dim=8",
                                  "model.coord_emb_size=4", "train.batch_size=4", "model.mbstd_group=2",
                                  "train.seed=5"])
    trainer = SingleProcessTrainer(cfg)
    rank = KeyedLatents(5, 4)
    real = torch.rand(4, 2, 3, 8, 8) * 2 - 1
    for step in range(2):
        trainer.begin_step(real, None)
        rank.begin_step(step, torch.arange(2, 4))
        for _ in range(2):  # G's fakes, then D's
            one = trainer.loss.sample_latents(trainer.G, 4)
            part = rank.draw(8, 8)
            for a, b in zip(one, part):
                assert torch.equal(a[2:], b)
        trainer.step += 1
    with pytest.raises(ValueError, match="train.batch_size is 4"):
        trainer.train_step(real[:2], torch.rand(2))


def test_a_sample_is_augmented_and_grouped_alike_however_the_batch_is_split():
    """Keyed draws (xflip, ADA, DiffAugment) and the minibatch-stddev order: one process holding the global batch
    of 8 and two holding 4 each give every sample the same augmentation and the same D logits (so a step's maths
    does not depend on the worker count). Without the order, the groups differ and so do the logits."""
    from digan.training.loss import motion_input
    from digan.training.recipe import group_order

    over = ["model.resolution=8", "model.input_resolution=4", "model.channel_max=8", "model.d_channel_max=8",
            "model.z_dim=8", "model.w_dim=8", "model.motion_z_dim=8", "model.coord_emb_size=4", "train.batch_size=8",
            "model.mbstd_group=4", "loss.xflip=true", "loss.diffaug_policy=color,translation,cutout", "loss.ada_p=0.6"]
    trainer = SingleProcessTrainer(load_config("demo-32", over), seed=0)
    loss, D, latents = trainer.loss, trainer.D, trainer.latents
    g = torch.Generator().manual_seed(0)
    real, dt = torch.rand(8, 2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(8, generator=g)

    def logits(ids: torch.Tensor, order: torch.Tensor | None):
        ids = ids if order is None else ids[order]
        latents.begin_step(7, ids)
        pair = loss.flip_reals(real[ids])
        with torch.no_grad():
            m, i, _ = loss.run_D(D.img, D.mot, motion_input(pair, dt[ids]))
        back = torch.empty_like(ids)
        back[ids - ids.min()] = torch.arange(len(ids))  # rows in global sample order
        return m[back], i.view(-1, 2)[back]

    order = group_order(8, 4)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and group_order(4, 4) is None
    whole = logits(torch.arange(8), order)
    halves = [logits(torch.arange(4 * r, 4 * r + 4), None) for r in range(2)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), whole[1], rtol=1e-5, atol=1e-6)
    plain = logits(torch.arange(8), None)  # the same samples and draws, strided groups across the halves
    assert not torch.allclose(plain[0], whole[0], rtol=1e-4, atol=1e-5)
