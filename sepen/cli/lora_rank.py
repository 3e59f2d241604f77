"""`sepen lora-rank`: the LoRA rank each delta's key change needs: per relative error, the
rank that keeps every layer within it (and the median layer's), from the singular values."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.command import add_deprecated, command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.lora import FULL, layer_ranks, ranks_needed, weight_changes


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen lora-rank", "The LoRA rank a delta's key change needs.")
    p.add_argument(
        "--delta",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        help="deltas of `sepen finetune` (one or more; repeatable)",
    )
    add_deprecated(p, "delta_paths", "--delta", "delta", type=Path, nargs="*", metavar="DELTA")
    p.add_argument("--model", help="the deltas' base model (default: the one each names)")
    p.add_argument(
        "--errors", type=float, nargs="+", default=[0.01, 0.05, 0.1], help="relative errors"
    )
    return p


def main(args: argparse.Namespace) -> None:
    if not args.delta:
        raise SepenError("no delta given: use --delta FILE [FILE ...]")
    if args.config is not None or args.set:
        config_from(args)
    bad = [e for e in args.errors if not 0 <= e < 1]
    if bad:
        raise SepenError(f"--errors {bad} must lie in [0, 1): e.g. 0.01 for 1%")
    for delta in args.delta:
        changes, _, _ = weight_changes(delta, args.model)
        if not changes:
            raise SepenError(f"delta {str(delta)!r} holds no trained layer")
        needed = ranks_needed(changes, args.errors)
        full = sorted(set(layer_ranks(changes, FULL).values()))  # each layer's min(out, in)
        parts = []
        for e in args.errors:
            ranks = sorted(n[e] for n in needed.values())
            parts.append(f"{e:g}: rank {ranks[-1]} (median layer {ranks[len(ranks) // 2]})")
        print(f"{delta}: " + ", ".join(parts) + f"; full ranks {full}")


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen lora-rank", lambda: main(args))
