"""The config tree: presets load, overrides apply with types, bad input fails with one clear line."""

import subprocess
import sys

import pytest

from digan.config import ConfigError, dump_yaml, from_dict, load_config, preset_names, to_dict


def test_presets_load_and_validate():
    assert {"digan-128", "demo-32", "demo-64"} <= set(preset_names())
    paper = load_config("digan-128")
    assert paper.model.resolution == 128 and paper.data.num_frames == 16
    assert paper.train.batch_size == 64 and paper.model.sigma_t == 0.25
    assert paper.loss.r1_gamma == 1.0 and paper.loss.r1_interval == 16
    for name in ("demo-32", "demo-64"):
        cfg = load_config(name)
        assert cfg.model.resolution in (32, 64)


def test_overrides_are_typed():
    cfg = load_config("demo-32", ["model.sigma_t=0.5", "train.total_kimg=3", "metrics.metrics=fvd16,kvd16",
                                  "dist.use_gpu=false", "optim.ema_kimg=null"])
    assert cfg.model.sigma_t == 0.5 and isinstance(cfg.train.total_kimg, float)
    assert cfg.metrics.metrics == ["fvd16", "kvd16"] and cfg.dist.use_gpu is False and cfg.optim.ema_kimg is None


@pytest.mark.parametrize("override, needle", [
    ("model.sigmat=1", "unknown config key 'model.sigmat'"),
    ("model.resolution=100", "model.resolution=100"),
    ("train.batch_size=abc", "train.batch_size='abc': expected an integer"),
    ("dist.zero_stage=3", "dist.zero_stage=3"),
    ("loss.xflip=maybe", "loss.xflip='maybe': expected true or false"),
    ("nonsense", "expected key.sub=value"),
])
def test_bad_overrides_fail_with_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("demo-32", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("demo-64", ["model.sigma_t=0.1"])
    path = tmp_path / "best.yaml"
    path.write_text(dump_yaml(cfg))
    assert to_dict(load_config(str(path))) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no such preset"):
        load_config("nope")
