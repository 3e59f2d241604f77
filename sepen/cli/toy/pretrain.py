"""`sepen toy pretrain`: train the toy world's base text-to-image model from scratch
(resumable: complete checkpoints, --resume latest, --until N)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sepen.command import command_parser, config_from, run_step
from sepen.toy.pretrain import pretrain

log = logging.getLogger("sepen.toy.pretrain")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy pretrain", "Train the toy world's base model from scratch.")
    p.add_argument("--out", type=Path, required=True, help="folder for the saved pipeline")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="checkpoints of the run (default: <out>.state); written every "
        "toy.pretrain.checkpointing_steps",
    )
    p.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    p.add_argument(
        "--until",
        type=int,
        metavar="STEP",
        help="write the model of this step (default: toy.pretrain.steps), e.g. a checkpoint "
        "chosen by the world card",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="stop after this step without writing the model (checkpoints stay)",
    )
    return p


def main(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    state_dir = args.state_dir or out.with_name(out.name + ".state")
    summary = pretrain(
        config_from(args),
        out,
        progress=True,
        state_dir=state_dir,
        resume=args.resume,
        until=args.until,
        stop_after=args.stop_after,
    )
    if summary is None:
        return {}
    for kind, rates in summary.get("validation", {}).items():
        s = rates["success"]
        log.info(
            "validation %s: success %.3f [%.3f, %.3f] (n=%d)",
            kind,
            s["mean"],
            s["lo"],
            s["hi"],
            s["n"],
        )
    return summary


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy pretrain", lambda: main(args))
