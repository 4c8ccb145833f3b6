"""Class-conditional DIGAN (model.num_classes > 0): labels from the shards' `label_index` through the loader to
G's mapping and both discriminators' projections; unconditional runs are untouched (tests/test_pinned_steps.py)."""

from __future__ import annotations

import pytest
import torch

from digan.config import DataConfig, load_config
from digan.data import build_pair_loader
from digan.models import motion_input
from digan.training import SingleProcessTrainer
from test_data_faults import contract_dataset

SMALL = ["model.input_resolution=8", "model.channel_max=16", "model.d_channel_max=16", "model.z_dim=16",
         "model.w_dim=16", "model.motion_z_dim=16", "model.coord_emb_size=8", "train.batch_size=4",
         "model.num_classes=3"]


def _label(key: str) -> dict:
    i = int(key[4:])
    return {} if i == 5 else {"label_index": i % 3, "label": f"class{i % 3}"}  # clip0005 has no label


def test_labels_flow_from_shards_to_generator_and_both_discriminators(tmp_path):
    """Every pair comes with its record's label_index; the unlabelled record is skipped and counted (and made up
    for by a repeat: exact epochs); a
    conditional step takes the labels, and D_M's and D_I's logits on those reals change with a wrong label."""
    contract_dataset(tmp_path, 12, 4, meta=_label)
    cfg = load_config("demo-32", SMALL)
    data = DataConfig(source=str(tmp_path), num_workers=0, resampled=False, shuffle_buffer=0)
    loader = build_pair_loader(data, 32, 4, num_classes=3)
    seen = {}
    for pair, dt, labels in loader:
        assert pair.shape == (4, 2, 3, 32, 32) and labels.dtype == torch.int64
        seen |= dict(zip(loader.last_keys, labels.tolist()))
    assert "clip0005" not in seen and len(seen) == 11
    assert all(v == int(k[4:]) % 3 for k, v in seen.items())
    assert loader.stats()["skipped_unlabelled"] == 1 and loader.stats()["padded"] == 1

    trainer = SingleProcessTrainer(cfg, seed=0)
    pair, dt, labels = next(iter(loader))
    stats = trainer.train_step(pair, dt, labels=labels)
    assert all(torch.isfinite(v).all() for v in stats.values())
    with torch.no_grad():
        x = motion_input(pair, dt)
        trainer.loss.augment.policy = []  # no augmentation: the same inputs twice
        right_M, right_I, _ = trainer.loss.run_D(trainer.D.img, trainer.D.mot, x, labels)
        wrong_M, wrong_I, _ = trainer.loss.run_D(trainer.D.img, trainer.D.mot, x, (labels + 1) % 3)
    assert ((right_M - wrong_M).abs() > 1e-6).all() and ((right_I - wrong_I).abs() > 1e-6).all()
    with pytest.raises(ValueError, match="needs class labels"):
        trainer.train_step(pair, dt)
    uncond = SingleProcessTrainer(load_config("demo-32", SMALL[:-1]), seed=0)
    with pytest.raises(ValueError, match="takes no class labels"):
        uncond.train_step(pair, dt, labels=labels)


def test_generate_renders_the_asked_classes_from_a_conditional_checkpoint(tmp_path, capsys):
    """`generate --classes` by name or index: each seed in each class, files named by class, frames equal to
    G(z, z_M, t, c); the default (no --classes) renders seed s in class s mod num_classes; one-line errors."""
    import numpy as np
    from PIL import Image

    from digan.generate import main
    from digan.models import build_generator, save_generator
    from digan.sampling import seed_latents, time_stamps, to_uint8

    cfg = load_config("demo-32", SMALL + ["model.class_names=[walk,run,jump]"])
    torch.manual_seed(0)
    G = build_generator(cfg.model).eval()
    save_generator(tmp_path / "ckpt", G, cfg, step=1, kimg=0.004)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--seeds", "4", "--classes", "jump,0", "--num-frames", "3",
                 "--format", "png", "--outdir", str(out)]) == 0
    z, zm = seed_latents([4], 16, 16)
    for c, name in ((2, "jump"), (0, "walk")):
        with torch.no_grad():
            want = to_uint8(G(z, zm, time_stamps(3).unsqueeze(0), c=torch.tensor([c])))[0]
        png = np.asarray(Image.open(out / f"seed0004-{name}.png")).reshape(32, 3, 32, 3).transpose(1, 0, 2, 3)
        assert np.abs(png.astype(int) - want.numpy().astype(int)).max() <= 1
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--seeds", "0-1", "--dry-run", "--outdir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seed0000-walk" in printed and "seed0001-run" in printed
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--classes", "swim", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'swim' is not a class" in err and "walk, run, jump" in err
    assert main(["--config", "demo-32", "--classes", "0", "--dry-run"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_the_driver_checks_classes_and_records_their_names():
    """model.num_classes against the manifest's class table, on the driver: too few classes or unlabelled data
    fail with one line naming the key; the names are filled in for the checkpoints."""
    from digan.train import LaunchError, check_classes

    cfg = load_config("demo-32", SMALL)
    check_classes(cfg, ["Biking", None])
    assert cfg.model.class_names == ["Biking", "class1", "class2"]
    named = load_config("demo-32", SMALL + ["model.class_names=[a,b,c]"])
    check_classes(named, ["Biking", "Phone"])
    assert named.model.class_names == ["a", "b", "c"]  # the config's own names win
    for classes, message in (([], "has no class labels"), (["a", "b", "c", "d"], "has 4 classes")):
        with pytest.raises(LaunchError, match=message) as e:
            check_classes(load_config("demo-32", SMALL), classes)
        assert str(e.value).startswith("model.num_classes=3") and "\n" not in str(e.value)


def test_evaluate_reports_per_class_fvd_of_a_conditional_checkpoint(tmp_path, capsys):
    """A conditional checkpoint's report holds the overall metrics and, per class, the FVD of that class's
    videos against that class's real clips (one labelled pass; N capped by the clips a class has)."""
    import json

    from digan.evaluate import main as evaluate_main
    from digan.models import build_generator, save_generator

    contract_dataset(tmp_path / "shards", 12, 4, meta=_label)  # classes 0, 1, 2: 4, 4, 3 clips (clip0005 unlabelled)
    cfg = load_config("demo-32", SMALL + ["model.class_names=[walk,run,jump]"])
    torch.manual_seed(0)
    save_generator(tmp_path / "ckpt", build_generator(cfg.model).eval(), cfg, step=1, kimg=0.004)
    evaluate_main(["--checkpoint", str(tmp_path / "ckpt"), f"data.source={tmp_path / 'shards'}",
                   "metrics.metrics=[fvd16]", "metrics.num_videos=4", "metrics.detector=proxy", "--batch-size", "4",
                   "--cache-dir", "", "--no-progress", "--out", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert "proxy_fvd16" in report["results"]
    per = report["per_class"]["proxy_fvd16"]
    assert [per[c]["num_videos"] for c in ("walk", "run", "jump")] == [4, 4, 3]
    assert all(per[c]["fvd"] > 0 for c in per)
