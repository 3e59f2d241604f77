"""`sepen prompts`: prompt sets, seeds and the models to finetune (the plan)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sepen.artifacts import read_json
from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.models.required import check_all
from sepen.plan import build_plan

log = logging.getLogger("sepen.plan")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen prompts", __doc__.split(": ", 1)[1], config_required=True)
    p.add_argument("--concepts", type=Path, required=True, help="concepts.json of `sepen concepts`")
    p.add_argument("--out", type=Path, required=True, help="the plan (prompts.json)")
    return p


def main(args: argparse.Namespace) -> dict:
    concepts = read_json(
        args.concepts, "concepts file", "sepen concepts", ("source", "concepts", "splits")
    )
    config = config_from(args)
    plan = build_plan(config, concepts)
    # the first job names every missing model, in one message, before any other work
    check_all(config)
    write_json(args.out, plan)
    log.info(
        "%d prompts x %d seeds, %d model(s)",
        len(plan["order"]),
        len(plan["seeds"]),
        len(plan["models"]),
    )
    return plan


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen prompts", lambda: main(args))
