"""The CLI side: every entry point uses these two functions, so flags are the same everywhere."""

from __future__ import annotations

import argparse
import sys

from digan.config.parse import load_config, preset_names
from digan.config.tree import Config, ConfigError


class HelpFormatter(argparse.HelpFormatter):
    """Help that states a flag's default once: appended as "(default: X)" unless the help text already
    names its default, and never for a default that says nothing (None, False, a positional's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if ("default" in text.lower() or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "demo-32") -> None:
    parser.add_argument("--config", default=default, metavar="PRESET|YAML",
                        help=f"preset name ({', '.join(preset_names())}) or a YAML file"
                             + (f" (default: {default})" if default is not None else ""))
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by the CLI; on a bad config print one line and exit 2."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
