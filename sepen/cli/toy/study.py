"""`sepen toy study`: a settings study on the toy world, one cell per settings change, each
finetuned per finetuning seed and compared with the base model on the same seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.command import add_deprecated, command_parser, run_step
from sepen.errors import SepenError
from sepen.toy.study import markdown_table, run_study


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy study", "A settings study on the toy world.", True)
    p.add_argument("--cells", type=Path, help="YAML list of cells, each {name, set}")
    add_deprecated(p, "--grid", "--cells", "cells", type=Path)
    p.add_argument("--out-dir", type=Path, required=True, help="the study's folder")
    return p


def main(args: argparse.Namespace) -> dict:
    if args.cells is None:
        raise SepenError("no cells given: use --cells FILE (a YAML list of {name, set})")
    study = run_study(args.config, args.cells, args.out_dir, args.set)
    print(markdown_table(study))
    return study


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy study", lambda: main(args))
