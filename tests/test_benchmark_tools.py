"""The analysis scripts under benchmarks/ whose figures the README quotes measure what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import frequencies  # noqa: E402

from digan.config import load_config  # noqa: E402
from digan.models import save_generator  # noqa: E402


def rows(capsys, argv: list[str]) -> list[dict]:
    assert frequencies.main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_frequencies_finds_the_frequency_every_video_shares(tmp_path, capsys):
    cfg = load_config("demo-32", ["model.fourier_lr_mult=1.0"])
    G = frequencies.initial_generator(cfg, None)
    fuser = G.blocks["b4"].coord_fuser
    with torch.no_grad():  # the same x frequency +12 rad/unit for feature 0 of every video, via the bias
        fuser.xyaffine.bias[0] += 12.0 / (fuser.fourier_scale * fuser.xyaffine.bias_gain)
    save_generator(tmp_path / "step-00000100", G, cfg, step=100, kimg=1.6)
    init, trained = rows(capsys, [str(tmp_path), "--videos", "16"])
    assert init["kimg"] == 0.0 and trained["kimg"] == 1.6
    before, after = init["b4"]["shared"][0], trained["b4"]["shared"][0]
    assert before < 4.0 and 10.0 < after < 12.0 + before + 1e-3, (before, after)
    assert trained["b4"]["median"] > init["b4"]["median"]  # feature 0 of every video moved by 12
    assert trained["b32"] == init["b32"] and trained["w_mean_norm"] == init["w_mean_norm"]
    # the initial frequency predictor put back: the initial figures again; the initial mapping: no change
    _, back = rows(capsys, [str(tmp_path), "--videos", "16", "--swap", "xyaffine"])
    assert back["b4"] == init["b4"]
    _, mapped = rows(capsys, [str(tmp_path), "--videos", "16", "--swap", "mapping"])
    assert mapped["b4"] == trained["b4"]


def test_frequencies_reads_plain_snapshots_with_their_config(tmp_path, capsys):
    cfg = load_config("demo-32", ["model.supersample=2"])
    G = frequencies.initial_generator(cfg, 0)
    (tmp_path / "snapshots").mkdir()
    torch.save(G.state_dict(), tmp_path / "snapshots" / "kimg-0005.0.pt")
    init, snap = rows(capsys, [str(tmp_path / "snapshots"), "--init-seed", "0", "--videos", "8", "model.supersample=2"])
    assert snap["kimg"] == 5.0 and {k: v for k, v in snap.items() if k in ("b4", "b32")} == \
        {k: v for k, v in init.items() if k in ("b4", "b32")}
