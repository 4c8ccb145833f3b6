"""The one parser: YAML presets and files, `key.sub=value` overrides and plain dicts -> a validated `Config`.

Types are checked against the tree's annotations (int -> float where allowed, `a,b,c` lists from the command
line); an unknown key or a wrong type is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from digan.config.tree import Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # shipped in the package; `configs/` links here


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing) and convert int->float where allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list of {_type_name(item)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid: {', '.join(prefix + n for n in names)})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build a validated Config from a (possibly partial) nested dict; missing keys keep their defaults."""
    cfg = Config()
    _apply(cfg, data or {}, "")
    return cfg.validate()


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def set_override(cfg: Config, override: str) -> None:
    """Apply one `key.sub=value` override in place (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node: Any = {}
    root = node
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    _apply(cfg, root, "")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"--config {source!r}: no such preset or file (presets: {', '.join(preset_names())})")
    elif not path.exists():
        raise ConfigError(f"--config {source!r}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {source!r}: invalid YAML ({str(e).splitlines()[0]})") from None
    return data


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path (None = defaults = the paper's model), then `key=value` overrides, then validate."""
    cfg = Config()
    if source:
        _apply(cfg, _read_yaml(source), "")
    for o in overrides or []:
        set_override(cfg, o)
    return cfg.validate()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
