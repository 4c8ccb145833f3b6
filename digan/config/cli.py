"""The CLI side: every entry point uses these two functions, so flags are the same everywhere."""

from __future__ import annotations

import argparse
import re
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


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (`prog: error: message`, exit 2), not usage + message;
    its help states defaults once (`HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


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


# ----------------------------------------------------------------------------------------------------
# Flag values shared by the CLIs.


class ArgumentError(ValueError):
    """A bad command-line argument: one line saying what is wrong."""


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> [0..7], '0,3,5' -> [0, 3, 5], '0-2,9' -> [0, 1, 2, 9] (seeds are >= 0)."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ArgumentError(f"bad seed {part.strip()!r} in {text!r}: use e.g. 0-7 or 0,3,5 (seeds >= 0)")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ArgumentError(f"seed range {part.strip()!r} is empty (end < start)")
        seeds.extend(range(lo, hi + 1))
    return seeds


def parse_classes(text: str | None, model) -> list[int] | None:
    """--classes (indices or the checkpoint's class names) -> class indices; None = the default per seed."""
    if text is None:
        return None
    if model.num_classes == 0:
        raise ArgumentError("--classes: the model is unconditional (model.num_classes=0)")
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item.isdigit() and int(item) < model.num_classes:
            out.append(int(item))
        elif item in model.class_names:
            out.append(model.class_names.index(item))
        else:
            names = f"; names: {', '.join(model.class_names[:10])}" if model.class_names else ""
            raise ArgumentError(f"--classes: {item!r} is not a class (indices 0-{model.num_classes - 1}{names})")
    if not out:
        raise ArgumentError("--classes: no class given")
    return out
