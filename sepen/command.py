"""What every `sepen` command shares: one parser helper with the --config/--set options, the
one-line deprecation of old option names, and the error exit.

A command's error (SepenError: a bad value, a missing file or model) is printed as one line
naming the problem and its fix, with exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sepen.config import load_config
from sepen.errors import SepenError
from sepen.logs import setup_logging

CONFIG_HELP = "YAML config (the sepen schema; keys it leaves out take their defaults)"
SET_HELP = "override one config key, e.g. sampling.steps=10 (repeatable; the value is YAML)"


def command_parser(
    prog: str, description: str, config_required: bool = False
) -> argparse.ArgumentParser:
    """The parser of a `sepen` command, with the shared --config and --set options."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_config_options(p, config_required)
    return p


def add_config_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", type=Path, required=required, help=CONFIG_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


class Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and prints one line
    naming the new spelling."""

    def __init__(self, option_strings, dest, new: str = "", target: str = "", **kwargs):
        self.new, self.target = new, target or dest
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None or values == []:  # an absent optional positional
            return
        old = option_string or f"the positional {self.metavar or self.dest}"
        print(f"{parser.prog}: note: {old} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.target, values)


def add_deprecated(p, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept `old` (an option string, or a positional's name) as an alias of `new`."""
    if old.startswith("-"):
        p.add_argument(old, dest=dest, action=Deprecated, new=new, default=None, **kwargs)
    else:
        kwargs.setdefault("nargs", "?")
        p.add_argument(old, action=Deprecated, new=new, target=dest, default=None, **kwargs)


def run_step(prog: str, body: Callable[[], object]) -> int:
    """Run a command's body with logging set up; SepenError -> message and exit status 2."""
    setup_logging()
    try:
        body()
    except SepenError as err:  # one line on stderr (the rule's log): the value and the fix
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def config_from(args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    """The validated config of a command's --config and --set (and `extra` overrides)."""
    return load_config(args.config, list(args.set) + list(extra or []))
