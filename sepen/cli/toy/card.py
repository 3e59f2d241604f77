"""`sepen toy card`: the world card of a toy base model, on card seeds no reported number
uses (sepen.toy.card); written beside the model (or --out)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.toy.card import CARD_FILE, card

log = logging.getLogger("sepen.toy.card")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy card", "The world card of a toy base model.")
    p.add_argument("--model", required=True, type=Path, help="the toy base model folder")
    p.add_argument("--out", type=Path, help=f"the card (default: <model>/{CARD_FILE})")
    return p


def main(args: argparse.Namespace) -> dict:
    config = config_from(args)
    if not (args.model / "model_index.json").is_file():
        raise SepenError(
            f"--model {str(args.model)!r} is not a toy pipeline folder (no model_index.json): "
            "give a folder made by `sepen toy pretrain`"
        )
    result = card(config, str(args.model))
    write_json(args.out or args.model / CARD_FILE, result)
    for name, row in result["criteria"].items():
        value = row["value"]
        shown = "-" if value is None else f"{value:.3f}"
        log.info("%-36s %s  %s", name, shown, "holds" if row["holds"] else "fails")
    return result


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy card", lambda: main(args))
