"""`sepen toy diagnose`: what one delta does - attention by token group and the key change,
against the base model on the same seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.toy.diagnose import diagnose
from sepen.toy.seeds import CARD_SEED


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy diagnose", "What one delta does to attention and keys.")
    p.add_argument("--model", required=True, help="the toy base model folder")
    p.add_argument("--delta", help="a SepEn delta (full to_k weights) to compare")
    p.add_argument("--concepts", nargs="+", required=True, help="the prompt's objects (2+)")
    p.add_argument("--images", type=int, default=16, help="images per measurement")
    p.add_argument(
        "--seed", type=int, default=CARD_SEED, help="first seed (default: the card seeds)"
    )
    p.add_argument("--out", type=Path, required=True, help="JSON")
    return p


def main(args: argparse.Namespace) -> dict:
    if len(args.concepts) < 2 or args.images < 1:
        raise SepenError(
            f"--concepts {args.concepts} / --images {args.images}: give two or more "
            "concepts and at least one image"
        )
    config = config_from(args)
    seeds = list(range(args.seed, args.seed + args.images))
    result = diagnose(config, args.model, args.delta, args.concepts, seeds)
    write_json(args.out, result)
    return result


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy diagnose", lambda: main(args))
