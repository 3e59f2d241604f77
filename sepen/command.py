"""What every `sepen <step>` command shares: the --config/--set options and the error exit.

A step's error (SepenError: a bad value, a missing file or model) is printed as one line naming
the problem and its fix, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sepen.errors import SepenError


def step_parser(prog: str, description: str, config_required: bool = True):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config", type=Path, required=config_required, help="YAML config (sepen schema)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. sampling.steps=10 (repeatable)",
    )
    return p


def run_step(prog: str, body: Callable[[], object]) -> int:
    """Run a step's body with logging set up; SepenError -> message and exit status 2."""
    from sepen.logs import setup_logging

    setup_logging()
    try:
        body()
    except SepenError as err:  # one line on stderr (the rule's log): the value and the fix
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
