"""`digan.predict`: fitting a DIGAN generator's codes to observed frames, then rendering other times; the
trivial baselines and the PSNR/SSIM report; the CLI on a real video file and on a shard record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from digan.config import load_config
from digan.models import build_generator, save_generator
from digan.predict import baseline, evaluate_prediction, fit_codes, frame_times, main
from digan.sampling import to_uint8
from digan.video_io import read_video, write_mp4
from test_data_faults import contract_dataset

SMALL = ["model.input_resolution=8", "model.channel_max=32", "model.z_dim=32", "model.w_dim=32",
         "model.motion_z_dim=32", "model.coord_emb_size=16"]


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return build_generator(load_config("demo-32", SMALL).model).eval().requires_grad_(False)


def test_inversion_recovers_a_video_the_generator_rendered(G):
    """Frames 0-7 of a video G rendered itself, fitted in w+ (pixels only): the observed frames and the unseen
    future frames 8-15 come back with an error far below that of a random video of the same generator."""
    g = torch.Generator().manual_seed(1)
    t = frame_times(list(range(16)), 16).unsqueeze(0)
    with torch.no_grad():
        target = G(torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g), t)[0]
        other = G(torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g), t)[0]
    fit = fit_codes(G, target[:8], frame_times(list(range(8)), 16), "w+", steps=200, lr=0.1)
    assert fit.losses[-1] < 0.1 * fit.losses[0]
    with torch.no_grad():
        out = G.render(fit.code(G), t)[0]
    err = lambda a, b: float((a - b).square().mean())  # noqa: E731
    assert err(out[:8], target[:8]) < 0.1 * err(other[:8], target[:8])
    assert err(out[8:], target[8:]) < 0.2 * err(other[8:], target[8:])
    assert fit.w.shape == (1, len(G.blocks), 32) and fit.z_motion.shape == (1, 32)
    again = fit_codes(G, target[:8], frame_times(list(range(8)), 16), "w+", steps=3, lr=0.1)
    assert again.losses == fit_codes(G, target[:8], frame_times(list(range(8)), 16), "w+", steps=3, lr=0.1).losses


def test_baselines_and_report():
    """copy-last repeats the last observed frame (the first before any), linear blending interpolates between
    the observed neighbours; the report splits unobserved frames into future and in-between."""
    clip = np.stack([np.full((8, 8, 3), 10 * k, np.uint8) for k in range(8)])
    obs = [1, 5]
    assert [int(f[0, 0, 0]) for f in baseline(clip, obs, [0, 2, 3, 6, 7], blend=False)] == [10, 10, 10, 50, 50]
    assert [int(f[0, 0, 0]) for f in baseline(clip, obs, [0, 2, 3, 6, 7], blend=True)] == [10, 20, 30, 50, 50]
    ours = clip.copy()  # a perfect prediction
    report = evaluate_prediction(clip, ours, obs, list(range(8)))
    assert report["future"]["ours"]["frames"] == 2 and report["between"]["ours"]["frames"] == 3
    assert report["between"]["ours"]["psnr"] == float("inf") or report["between"]["ours"]["psnr"] > 90
    assert report["between"]["linear_blend"]["ssim"] == pytest.approx(1.0)  # exact for a linear ramp
    assert report["future"]["copy_last"]["psnr"] < 30


def test_cli_on_a_video_file_and_on_a_shard_record(G, tmp_path, capsys):
    cfg = load_config("demo-32", SMALL)
    save_generator(tmp_path / "ckpt", G, cfg, step=1, kimg=0.004)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        video = to_uint8(G(torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g),
                           frame_times(list(range(12)), 16).unsqueeze(0))[0]).numpy()
    write_mp4(tmp_path / "clip.mp4", video, fps=8)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--video", str(tmp_path / "clip.mp4"), "--observe", "0-5",
                 "--predict", "0-13", "--steps", "30", "--perceptual", "0", "--outdir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["future"]) == {"ours", "copy_last", "linear_blend"}
    assert report["future"]["ours"]["frames"] == 6  # frames 6-11 have true frames; 12-13 are beyond the file
    assert read_video(out / "predicted.mp4").shape == (14, 32, 32, 3)
    saved = torch.load(out / "codes.pt", weights_only=True)
    assert saved["space"] == "w" and saved["w"].shape == (1, 32)
    assert "future   ours" in capsys.readouterr().out
    # a record of a shard folder, with the perceptual term on
    contract_dataset(tmp_path / "shards", 4, 2)
    out2 = tmp_path / "out2"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "shards"), "--key", "clip0002",
                 "--observe", "0,4,8", "--predict", "0-15", "--steps", "2", "--outdir", str(out2)]) == 0
    assert json.loads((out2 / "report.json").read_text())["between"]["ours"]["frames"] == 6
    for bad, message in ((["--observe", "3-1"], "--observe: frame range"), (["--key", "nope"], "'nope'"),
                         (["--class", "0"], "unconditional")):
        args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "shards"), "--key", "clip0001",
                "--outdir", str(tmp_path / "o")]
        assert main(args + bad + ["--steps", "1", "--perceptual", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
