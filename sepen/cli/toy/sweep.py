"""`sepen toy sweep`: single objects and held-out pairs on the card seeds at other sampling
settings of one toy base model (sepen.toy.card.sampling_sweep), the config's own first."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.toy.card import parse_setting, sampling_sweep


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "sepen toy sweep", "A toy base model on the card seeds at other sampling settings."
    )
    p.add_argument("--model", required=True, type=Path, help="the toy base model folder")
    p.add_argument(
        "--try",
        dest="settings",
        action="append",
        required=True,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="one setting beside the config's own (repeatable); keys: guidance, shift, steps",
    )
    p.add_argument("--out", required=True, type=Path, help="the sweep's JSON file")
    return p


def main(args: argparse.Namespace) -> dict:
    config = config_from(args)
    settings = [parse_setting(text) for text in args.settings]  # bad input: before any work
    if not (args.model / "model_index.json").is_file():
        raise SepenError(
            f"--model {str(args.model)!r} is not a toy pipeline folder (no model_index.json): "
            "give a folder made by `sepen toy pretrain`"
        )
    result = sampling_sweep(config, str(args.model), settings)
    write_json(args.out, result)
    return result


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy sweep", lambda: main(args))
