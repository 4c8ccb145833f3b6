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


def test_wheel_ships_the_presets(tmp_path):
    """A non-editable install loads every preset: the YAML files travel inside the `digan` package."""
    import shutil
    import zipfile

    from digan.config import CONFIG_DIR

    root = CONFIG_DIR.parent.parent
    src = tmp_path / "src"
    for name in ("digan", "data_shards", "sweeps"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("digan-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert {f"digan/configs/{n}.yaml" for n in preset_names()} <= set(z.namelist())
        z.extractall(tmp_path / "site")
    code = ("import digan.config as c; print(c.CONFIG_DIR); "
            "print(*(c.load_config(n).model.resolution for n in c.preset_names()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                         check=True, capture_output=True, text=True).stdout.split("\n")
    assert out[0] == str(tmp_path / "site" / "digan" / "configs")
    assert sorted(map(int, out[1].split())) == sorted(load_config(n).model.resolution for n in preset_names())


@pytest.mark.parametrize("module", ["digan.train", "digan.generate", "digan.evaluate", "sweeps.tune_freq"])
def test_help_states_each_default_once(module, monkeypatch, capsys):
    """--help: a default is printed once (not the help's own "(default: X)" plus argparse's), never as
    "(default: None)" / "(default: False)"."""
    import importlib
    import re

    monkeypatch.setenv("COLUMNS", "400")  # one line per option, so "once" can be checked per line
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text or "--checkpoint" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for line in text.splitlines():
        assert line.count("(default:") <= 1 and len(re.findall(r"\bdefault\b", line.lower())) <= 1, line
    if module == "digan.train":
        assert "(default: demo-32)" in text
    if module == "digan.evaluate":
        assert "(default: 16)" in text  # plain defaults still shown
