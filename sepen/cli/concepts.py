"""`sepen concepts`: the experiment's concept lists with their seen/unseen splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.plan import concept_lists


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen concepts", __doc__.split(": ", 1)[1], config_required=True)
    p.add_argument("--out", type=Path, required=True, help="concepts.json")
    return p


def main(args: argparse.Namespace) -> None:
    write_json(args.out, concept_lists(config_from(args)))


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen concepts", lambda: main(args))
