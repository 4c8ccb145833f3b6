"""The sweep's search space: dotted config keys -> Optuna distributions, checked against the config tree; the
trial configs; the Optuna study storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from digan.config import Config, ConfigError, from_dict, set_override, to_dict

DEFAULT_SPACE = {
    "model.sigma_t": {"type": "loguniform", "low": 0.03, "high": 3.0},
    "loss.r1_gamma": {"type": "loguniform", "low": 0.01, "high": 30.0},
}


# ----------------------------------------------------------------------------------------------------
# Search space: dotted config keys -> Optuna distributions.


def parse_param(spec: str) -> tuple[str, dict[str, Any]]:
    """`model.sigma_t=loguniform:0.03:3` | `uniform:a:b` | `int:a:b` | `choice:a,b,c` -> (key, dict)."""
    if "=" not in spec:
        raise ConfigError(f"--param {spec!r}: expected key=dist:low:high (e.g. model.sigma_t=loguniform:0.03:3)")
    key, dist = spec.split("=", 1)
    kind, _, rest = dist.partition(":")
    if kind == "choice":
        values = [yaml.safe_load(v) for v in rest.split(",") if v]
        if not values:
            raise ConfigError(f"--param {spec!r}: choice needs at least one value")
        return key, {"type": "choice", "values": values}
    parts = rest.split(":")
    if kind not in ("loguniform", "uniform", "int") or len(parts) != 2:
        raise ConfigError(f"--param {spec!r}: expected loguniform|uniform|int:low:high or choice:a,b,c")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--param {spec!r}: low and high must be numbers") from None
    return key, {"type": kind, "low": low, "high": high}


def build_distributions(space: dict[str, dict[str, Any]], base: Config):
    """Check every key against the config tree and turn the space into Optuna distributions."""
    import optuna.distributions as od

    out = {}
    for key, d in space.items():
        kind = d.get("type")
        probe = from_dict(to_dict(base))
        if kind == "choice":
            values = list(d["values"])
            for v in values:  # fails with one line on an unknown key or a value of the wrong type
                set_override(probe, f"{key}={yaml.safe_dump(v, default_flow_style=True).strip()}")
            out[key] = od.CategoricalDistribution(values)
            continue
        low, high = float(d["low"]), float(d["high"])
        if not low < high:
            raise ConfigError(f"search space {key}: low={low} must be < high={high}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"search space {key}: log-uniform needs low > 0 (got {low})")
        set_override(probe, f"{key}={int(low) if kind == 'int' else low}")
        if kind == "int":
            out[key] = od.IntDistribution(int(low), int(high))
        elif kind in ("loguniform", "uniform"):
            out[key] = od.FloatDistribution(low, high, log=kind == "loguniform")
        else:
            raise ConfigError(f"search space {key}: unknown type {kind!r} (loguniform, uniform, int, choice)")
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values applied (validated)."""
    cfg = from_dict(base)
    for key, value in params.items():
        set_override(cfg, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return cfg.validate()


def make_study_storage(spec: str | None):
    """Optuna storage the user can inspect/resume with Optuna's tools: *.db/*.sqlite, a journal file, or a URL."""
    if not spec:
        return None
    import optuna

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(spec).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return optuna.storages.RDBStorage(f"sqlite:///{path}")
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
