"""`python -m digan.generate` end to end: real PyAV-encoded MP4s decoded back, GIFs, PNG frame grids,
checkpoint loading, seeds -> latents, chunked rendering, --dry-run and one-line argument errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digan.config import load_config
from digan.generate import main, parse_seeds
from digan.sampling import seed_latents, time_stamps, to_uint8
from digan.models import build_generator, save_generator
from digan.video_io import (Mp4Writer, frame_grid, read_video, video_grid, write_gif, write_mp4,
                            write_png)

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args):
    """The real console entry point in a fresh process."""
    return subprocess.run([sys.executable, "-m", "digan.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A demo-32 generator saved as a run folder with two checkpoints (the latest one must be used)."""
    cfg = load_config("demo-32")
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(123)
    old = build_generator(cfg.model).eval()
    save_generator(run / "checkpoints" / "step-00000008", old, cfg, step=8, kimg=0.128)
    torch.manual_seed(456)
    G = build_generator(cfg.model).eval()
    save_generator(run / "checkpoints" / "step-00000016", G, cfg, step=16, kimg=0.256)
    return run, cfg, G, old


def test_parse_seeds_and_latents():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0,3,5") == [0, 3, 5]
    assert parse_seeds("2-3, 9") == [2, 3, 9]
    z, zm = seed_latents([0, 1], 8, 6)
    assert z.shape == (2, 8) and zm.shape == (2, 6)
    assert torch.equal(z[0], torch.randn(8, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(z[1], torch.randn(8, generator=g)) and torch.equal(zm[1], torch.randn(6, generator=g))
    z2, zm2 = seed_latents([0, 0], 8, 6, motion_seeds=[0, 1])
    assert torch.equal(z2[0], z2[1]) and torch.equal(zm2[0], zm[0]) and torch.equal(zm2[1], zm[1])
    assert torch.allclose(time_stamps(16), torch.arange(16) / 15)


def test_video_io_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    # smooth content so H.264 at crf 18 reproduces it closely
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    frames = np.stack([np.stack([(xx * 8 + 6 * i) % 256, yy * 8, np.full((32, 32), 40.0 * (i % 5))], -1)
                       for i in range(10)]).astype(np.uint8)
    with Mp4Writer(tmp_path / "a.mp4", fps=8) as w:  # streamed in two chunks
        w.write(frames[:4])
        w.write(torch.from_numpy(frames[4:]))
    back = read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 8  # yuv420p chroma + crf 18; random is ~85
    write_gif(tmp_path / "a.gif", frames, fps=8)
    gif = read_video(tmp_path / "a.gif")
    assert gif.shape == frames.shape
    assert np.abs(gif.astype(int) - frames.astype(int)).mean() < 12  # 256-colour palette
    grid = frame_grid(frames, num_cols=4)
    assert grid.shape == (3 * 32, 4 * 32, 3)
    assert np.array_equal(grid[32:64, 0:32], frames[4]) and not grid[64:, 64:].any()
    write_png(tmp_path / "g.png", grid)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
    vg = video_grid(np.stack([frames, frames[::-1]]), num_cols=2)
    assert vg.shape == (10, 32, 64, 3) and np.array_equal(vg[0, :, 32:], frames[-1])
    odd = rng.integers(0, 255, (3, 15, 17, 3), dtype=np.uint8)
    write_mp4(tmp_path / "odd.mp4", odd)  # odd sides are padded to even for yuv420p
    assert read_video(tmp_path / "odd.mp4").shape == (3, 16, 18, 3)
    with pytest.raises(ValueError, match="uint8"):
        write_gif(tmp_path / "bad.gif", frames.astype(np.float32))


def test_cli_end_to_end_fresh_model(tmp_path):
    """Console entry in a subprocess: mp4 (decoded back), gif and png, with chunked rendering (3 frames)."""
    out = tmp_path / "out"
    res = run_cli("--config", "demo-32", "--seeds", "0-1", "--num-frames", "5", "--format", "mp4,gif,png",
                  "--max-frames-in-memory", "3", "--outdir", str(out))
    assert res.returncode == 0, res.stderr
    assert "FRESH UNTRAINED" in res.stdout and "chunks of 3 frames" in res.stdout
    assert "rendering" in res.stderr  # tqdm progress bar
    pngs = {}
    for seed in (0, 1):
        mp4 = read_video(out / f"seed{seed:04d}.mp4")
        assert mp4.shape == (5, 32, 32, 3)
        gif = read_video(out / f"seed{seed:04d}.gif")
        assert gif.shape == (5, 32, 32, 3)
        png = np.asarray(Image.open(out / f"seed{seed:04d}.png"))
        assert png.shape == (32, 5 * 32, 3)
        pngs[seed] = (mp4.astype(int), png.reshape(32, 5, 32, 3).transpose(1, 0, 2, 3).astype(int))
    # The lossless PNG holds the exact frames. The MP4 (yuv420p keeps chroma at half resolution, which
    # hurts this untrained model's saturated pixel noise) matches each frame best at the same index and is
    # far closer to its own video than to the other seed's.
    for seed, other in ((0, 1), (1, 0)):
        mp4, frames = pngs[seed]
        err = np.abs(mp4[:, None] - frames[None]).mean(axis=(2, 3, 4))  # [mp4 frame, png frame]
        assert (err.argmin(axis=1) == np.arange(5)).all()
        assert np.diag(err).mean() < 0.5 * np.abs(mp4 - pngs[other][1]).mean()


def test_cli_from_checkpoint_matches_direct_rendering(trained_like, tmp_path):
    run, cfg, G, old = trained_like
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(run), "--seeds", "2,5", "--num-frames", "4", "--t-start", "0.5",
               "--t-end", "2", "--format", "png", "--outdir", str(out), "--max-frames-in-memory", "4"])
    assert rc == 0
    z, zm = seed_latents([2, 5], cfg.model.z_dim, cfg.model.motion_z_dim)
    with torch.no_grad():
        expected = to_uint8(G(z, zm, time_stamps(4, 0.5, 2).expand(2, -1)))  # the latest checkpoint's G
        older = to_uint8(old(z, zm, time_stamps(4, 0.5, 2).expand(2, -1)))
    for i, seed in enumerate((2, 5)):
        png = np.asarray(Image.open(out / f"seed{seed:04d}.png")).astype(int)
        exp = frame_grid(expected[i].numpy(), num_cols=4).astype(int)
        # the CLI renders one video per batch here: float rounding may move a rare pixel by one level
        assert np.abs(png - exp).max() <= 1 and (png != exp).mean() < 1e-3
        assert (png != frame_grid(older[i].numpy(), num_cols=4)).mean() > 0.1


def test_cli_motion_seeds_and_scale(trained_like, tmp_path):
    run, cfg, G, _ = trained_like
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(run / "checkpoints"), "--seeds", "3", "--motion-seeds", "0-2",
               "--num-frames", "3", "--scale", "2", "--format", "png", "--outdir", str(out)])
    assert rc == 0
    grids = [np.asarray(Image.open(out / f"seed0003-motion{m:04d}.png")) for m in range(3)]
    assert all(g.shape == (64, 3 * 64, 3) for g in grids)
    # t = 0: the phase phi(0) does not depend on z_M, so all motions share the first frame
    assert np.array_equal(grids[0][:, :64], grids[1][:, :64]) and np.array_equal(grids[0][:, :64], grids[2][:, :64])
    assert not np.array_equal(grids[0][:, 128:], grids[1][:, 128:])


def test_dry_run_renders_nothing(trained_like, tmp_path, capsys):
    run = trained_like[0]
    out = tmp_path / "out"
    assert main(["--config", "demo-64", "--seeds", "0-2", "--dry-run", "--outdir", str(out),
                 "model.sigma_t=0.5"]) == 0
    text = capsys.readouterr().out
    assert "sigma_t: 0.5" in text and "would write" in text and "3 videos x 16 frames of 64x64" in text
    assert main(["--checkpoint", str(run), "--dry-run", "--outdir", str(out)]) == 0
    assert "step-00000016" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    ([], "give --checkpoint"),
    (["--config", "demo-32", "--seeds", "5-2"], "empty"),
    (["--config", "demo-32", "--seeds", "a"], "bad seed"),
    (["--config", "demo-32", "--num-frames", "0"], "--num-frames"),
    (["--config", "demo-32", "--num-frames", "x"], "invalid int"),
    (["--config", "demo-32", "--scale", "0"], "--scale"),
    (["--config", "demo-32", "--format", "avi"], "--format"),
    (["--config", "demo-32", "--max-frames-in-memory", "0"], "--max-frames-in-memory"),
    (["--config", "demo-32", "model.sigma_t=-1"], "sigma_t"),
    (["--config", "nope"], "no such preset"),
    (["--checkpoint", "/nonexistent/run"], "does not exist"),
    (["--checkpoint", "/tmp", "--config", "demo-32"], "carries its own config"),
])
def test_bad_arguments_fail_with_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rc = main([*args, "--outdir", str(tmp_path / "o")])
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def _junk_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not generator exports, each with what the one-line error must say about it."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, data, says in [("random.pt", bytes(range(256)) * 8, "not a torch.save file"),
                             ("empty.pt", b"", "the file is empty"),
                             ("notes.txt", b"hello\n", "not a torch.save file")]:
        (folder / name).write_bytes(data)
        made[name] = (folder / name, says)
    torch.save({"model": torch.zeros(2)}, folder / "other.pt")  # a torch file, but another kind of checkpoint
    made["other.pt"] = (folder / "other.pt", "not a generator export")
    return made


def test_junk_checkpoint_fails_with_one_line_naming_the_file(tmp_path, capsys):
    for path, says in _junk_checkpoints(tmp_path / "junk").values():
        assert main(["--checkpoint", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and says in err, err
    # In a fresh process too: no torch warning, traceback or advice around the line.
    r = run_cli("--checkpoint", str(tmp_path / "junk" / "random.pt"), "--outdir", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"digan-generate: error: {tmp_path / 'junk' / 'random.pt'}: not a readable generator checkpoint: "
        "not a torch.save file (it starts with b'\\x00\\x01\\x02\\x03', not a ZIP archive)"], r.stderr


def test_seed_is_the_same_video_in_generate_evaluate_and_training_samples(trained_like, tmp_path, monkeypatch):
    """One sampling path (digan.sampling): `digan.generate --seeds 3` (lossless PNG frames), the fake videos of
    `digan.evaluate`/the training metrics with base seed 2 (their second video is seed 3) and the training
    sample grid of a run with train.seed=3 (its first tile) hold the same frames (up to one level in a rare
    pixel where a batch of several videos rounds differently from a batch of one)."""
    import digan.video_io
    from digan.distributed.run_logger import RunLogger
    from digan.metrics.compute import iterate_fake_videos

    run, cfg, G, _ = trained_like
    res = run_cli("--checkpoint", str(run), "--seeds", "3", "--num-frames", "16", "--format", "png",
                  "--outdir", str(tmp_path / "gen"))
    assert res.returncode == 0, res.stderr
    png = np.asarray(Image.open(tmp_path / "gen" / "seed0003.png"))  # 16 frames in 2 rows of 8
    generated = torch.from_numpy(png.reshape(2, 32, 8, 32, 3).transpose(0, 2, 1, 3, 4).reshape(16, 32, 32, 3).copy())

    def same(a, b):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (int(diff.max()), int((diff > 0).sum()))

    same(torch.cat(list(iterate_fake_videos(G, 2, 16, seed=2, batch_size=2)))[1], generated)

    captured = {}
    monkeypatch.setattr(digan.video_io, "write_mp4", lambda path, frames, fps=8.0: captured.setdefault("grid", frames))
    monkeypatch.setattr(digan.video_io, "tensorboard_video", lambda *a, **k: None)
    monkeypatch.setattr("os.replace", lambda *a: None)

    class Storage:  # what Ray Train hands the logger: a filesystem and the run's path on it
        import pyarrow.fs as _fs
        storage_filesystem = _fs.LocalFileSystem()
        experiment_fs_path = str(tmp_path / "run")

    train_cfg = load_config("demo-32", ["train.seed=3", "train.num_sample_videos=4"])
    logger = RunLogger(train_cfg, Storage(), enabled=True)
    logger.write_samples(G, step=1)
    logger.close()
    tile = torch.from_numpy(np.asarray(captured["grid"]))[:, :32, :32]  # 2x2 grid: seed 3 is the top left
    same(tile, generated)
