"""`sepen export-lora`: a SepEn delta as a LoRA file for diffusers, ComfyUI and AUTOMATIC1111
(the factorisation and formats: sepen.lora)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sepen.command import add_deprecated, command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.lora import FORMATS, FULL, export_lora

log = logging.getLogger("sepen.lora")


def _rank(text: str) -> int | str:
    if text == FULL:
        return FULL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rank: give a number (e.g. 16) or {FULL!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen export-lora", "A SepEn delta as a LoRA file (diffusers or kohya).")
    p.add_argument("--delta", type=Path, help="a delta of `sepen finetune`")
    add_deprecated(p, "delta_path", "--delta", "delta", type=Path, metavar="DELTA")
    p.add_argument(
        "--rank",
        type=_rank,
        help="LoRA rank of every layer, or 'full': each layer at its own full rank, exact "
        "(a LoRA delta: its own rank by default)",
    )
    p.add_argument(
        "--format", choices=FORMATS, default="diffusers", help="diffusers (PEFT) or kohya keys"
    )
    p.add_argument("--model", help="the delta's base model (default: the one it names)")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file (.safetensors)")
    return p


def _shown(report: dict) -> str:
    ranks = sorted(set(report["ranks"].values()))
    if report["rank"] != FULL:
        return str(report["rank"])
    return f"full: {ranks[0]}" if len(ranks) == 1 else f"full: {ranks[0]}-{ranks[-1]} by layer"


def main(args: argparse.Namespace) -> None:
    if args.delta is None:
        raise SepenError("no delta given: use --delta FILE (a delta of `sepen finetune`)")
    if args.config is not None or args.set:
        config_from(args)  # validated; the base model comes from --model or the delta
    report = export_lora(args.delta, args.out, args.rank, args.format, args.model)
    err = report["relative_error"]
    for module, value in err["layers"].items():
        log.info("%s: relative error %.3g", module, value)
    print(
        f"wrote {args.out} ({args.format}, rank {_shown(report)}, "
        f"{len(err['layers'])} layers): relative error of the weight change "
        f"{err['overall']:.3g} overall"
    )


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen export-lora", lambda: main(args))
