"""A short single-process DIGAN run on moving squares: the real recipe, the real (shrunk demo-32) models.

Shows the recipe learns in the right direction: the discriminators separate real from fake after D steps,
G's loss falls after G steps against a fixed D, and nothing turns NaN, R1 steps included.
"""

import math

import pytest
import torch

from digan.config import load_config
from digan.training import DIGANLoss, d_step, fit, g_step, sample_time_pairs

RES, NUM_FRAMES = 32, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: one intra-op thread (conftest)


# demo-32 with narrower nets and a smaller batch, so the test runs in well under a minute on 2 cores.
OVERRIDES = ["train.batch_size=8", "model.channel_max=32", "model.d_channel_max=32", "model.z_dim=64",
             "model.w_dim=64", "model.motion_z_dim=64", "model.coord_emb_size=16", "loss.r1_interval=2",
             "loss.r1_gamma=0.1", "optim.ema_kimg=0.05", "optim.lr=0.0025"]  # the rate it was tuned with


def moving_squares(num_clips: int, generator: torch.Generator) -> torch.Tensor:
    """Clips [N, T, 3, H, W] in [-1, 1]: a bright coloured square moving at constant velocity on black."""
    size = 7
    start = torch.rand(num_clips, 2, generator=generator) * (RES - size)
    angle = torch.rand(num_clips, generator=generator) * 2 * math.pi
    velocity = torch.stack([angle.cos(), angle.sin()], dim=1) * 1.0  # pixels per frame
    color = 0.3 + 0.7 * torch.rand(num_clips, 3, generator=generator)
    t = torch.arange(NUM_FRAMES, dtype=torch.float32)
    pos = start[:, None] + velocity[:, None] * t[None, :, None]  # [N, T, 2]
    # Bounce off the borders so the square stays in view: reflect into [0, RES - size].
    span = RES - size
    pos = span - (pos.remainder(2 * span) - span).abs()
    ys = torch.arange(RES).view(1, 1, RES, 1)
    xs = torch.arange(RES).view(1, 1, 1, RES)
    y0, x0 = pos[..., 0].round().long()[..., None, None], pos[..., 1].round().long()[..., None, None]
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)  # [N, T, H, W]
    clips = inside[:, :, None].float() * color[:, None, :, None, None]
    return clips * 2 - 1


def pair_batches(clips: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless (pair [B, 2, 3, H, W], dt [B]): frame indices floor(N*u) of sorted Beta(2,1)/Beta(1,2) draws."""
    while True:
        idx = torch.randint(0, clips.shape[0], (batch_size,), generator=generator)
        t = sample_time_pairs(batch_size, generator=generator)
        frames = (t * NUM_FRAMES).floor().long().clamp(max=NUM_FRAMES - 1)  # sorted, like the official loader
        pair = clips[idx[:, None], frames]
        yield pair, (frames[:, 1] - frames[:, 0]).float() / (NUM_FRAMES - 1)


def test_moving_squares_dataset():
    clips = moving_squares(4, torch.Generator().manual_seed(0))
    assert clips.shape == (4, NUM_FRAMES, 3, RES, RES) and clips.min() == -1 and clips.max() <= 1
    lit = (clips > -1).any(2)  # [N, T, H, W]
    assert (lit.flatten(2).sum(2) == 49).all()  # the whole 7x7 square is in every frame
    assert not torch.equal(lit[:, 0], lit[:, -1])  # and it moves
    pair, dt = next(pair_batches(clips, 16, torch.Generator().manual_seed(0)))
    assert pair.shape == (16, 2, 3, RES, RES) and ((dt >= 0) & (dt <= 1)).all()
    assert torch.allclose(dt * 15, (dt * 15).round())


def test_single_process_training_learns():
    torch.manual_seed(0)
    cfg = load_config("demo-32", OVERRIDES)
    gen = torch.Generator().manual_seed(0)
    clips = moving_squares(64, gen)
    batches = pair_batches(clips, cfg.train.batch_size, gen)

    # A few full iterations (R1 on steps 0 and 2): all finite, R1 present and positive.
    trainer, history = fit(cfg, batches, num_steps=4, seed=0)
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert [("r1" in h) for h in history] == [True, False, True, False]
    assert all(h["r1"] > 0 for h in history if "r1" in h)
    G, D_img, D_mot, loss = trainer.G, trainer.D.img, trainer.D.mot, trainer.loss
    probe = DIGANLoss.from_config(cfg.loss)  # fakes from the global RNG: fixed by a manual seed
    B = cfg.train.batch_size
    eval_real, eval_dt = next(pair_batches(clips, 2 * B, torch.Generator().manual_seed(123)))

    def d_gaps():
        """Mean real minus mean fake logit of both Ds, on fixed real pairs, fixed z and fixed augmentation."""
        torch.manual_seed(7)
        with torch.no_grad():
            _, s = probe.d_loss(G, D_img, D_mot, eval_real, eval_dt, do_r1=False)
        return (s["D_M_real"] - s["D_M_fake"]).item(), (s["D_I_real"] - s["D_I_fake"]).item()

    def g_loss_fixed():
        torch.manual_seed(11)
        with torch.no_grad():
            value, _ = probe.g_loss(G, D_img, D_mot, 2 * B)
        return value.item()

    # D steps only (G fixed): real and fake logits separate for both discriminators.
    gap_M0, gap_I0 = d_gaps()
    for step in range(8):
        real_pair, real_dt = next(batches)
        stats = d_step(G, D_img, D_mot, trainer.d_updater, loss, real_pair, real_dt, do_r1=loss.r1_due(step))
        assert all(torch.isfinite(v).all() for v in stats.values())
    gap_M1, gap_I1 = d_gaps()
    assert gap_M1 > gap_M0 and gap_M1 > 0, (gap_M0, gap_M1)
    assert gap_I1 > gap_I0 and gap_I1 > 0, (gap_I0, gap_I1)

    # G steps only (D fixed): G's loss against that D falls.
    d_before = [p.detach().clone() for p in trainer.D.parameters()]
    loss_G0 = g_loss_fixed()
    for _ in range(8):
        stats = g_step(G, D_img, D_mot, trainer.g_updater, loss, B)
        assert torch.isfinite(stats["loss_G"])
    loss_G1 = g_loss_fixed()
    assert loss_G1 < loss_G0, (loss_G0, loss_G1)
    assert all(torch.equal(a, b) for a, b in zip(d_before, trainer.D.parameters()))  # D untouched by G's steps

    # G_ema followed G and stayed finite.
    assert all(torch.isfinite(p).all() for p in trainer.G_ema.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(trainer.G_ema.parameters(), G.parameters()))
