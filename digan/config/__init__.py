"""One typed config tree and its one parser.

A run is described by `Config`, a tree of dataclasses. It is loaded from a preset name (a YAML file
under `digan/configs/`, linked as `configs/` at the top of the repository, shipped in the wheel)
or a YAML path, then overridden from the command line with `key.sub=value` pairs:

    cfg = load_config("demo-32", ["model.sigma_t=0.5", "train.total_kimg=2"])

Unknown keys and values of the wrong type fail with one `ConfigError` line that names the key. Every
component receives only its own sub-config (`build_generator(cfg.model)`), never argparse or the
environment. `to_dict`/`from_dict` round-trip the tree, so a resolved config can be stored in every
checkpoint and re-loaded as a YAML file by `python -m digan.train --config`.
"""

from digan.config.cli import (ArgumentError, HelpFormatter, OneLineParser, add_config_args, config_from_args,
                              parse_classes, parse_seeds)
from digan.config.parse import CONFIG_DIR, dump_yaml, from_dict, load_config, preset_names, set_override, to_dict
from digan.config.tree import (DETECTORS, DIFFAUG_POLICIES, METRICS, PRECISIONS, PROTOCOLS, R1_SCHEDULES, START_METHODS,
                               Config, ConfigError, DataConfig, DistConfig, LossConfig, MetricsConfig, ModelConfig,
                               OptimConfig, TrainConfig)

__all__ = ["add_config_args", "ArgumentError", "Config", "CONFIG_DIR", "config_from_args", "ConfigError",
           "DataConfig", "DETECTORS", "DIFFAUG_POLICIES", "DistConfig", "dump_yaml", "from_dict", "HelpFormatter",
           "load_config", "LossConfig", "METRICS", "MetricsConfig", "ModelConfig", "OneLineParser", "OptimConfig",
           "parse_classes", "parse_seeds", "PRECISIONS", "preset_names", "PROTOCOLS", "R1_SCHEDULES",
           "set_override", "START_METHODS", "to_dict", "TrainConfig"]
