"""`sepen toy evaluate`: exact-detector metrics of a toy base model, and of a SepEn delta
against it on the same seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.atomic import write_bytes, write_json
from sepen.command import command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.report.figures import png
from sepen.toy.evaluate import evaluate, image_grid


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy evaluate", "Exact-detector metrics of the toy world.")
    p.add_argument("--model", required=True, help="the toy base model folder")
    p.add_argument("--delta", help="a SepEn delta to compare with the base model")
    p.add_argument("--images", type=int, default=64, help="images per prompt kind and method")
    p.add_argument("--seed", type=int, default=0, help="first sampling seed")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON")
    p.add_argument("--grid", type=Path, help="PNG of sample images (same seeds per method)")
    return p


def main(args: argparse.Namespace) -> dict:
    if args.images < 1:
        raise SepenError(f"--images {args.images} must be at least 1")
    config = config_from(args)
    metrics, images = evaluate(config, args.model, args.delta, args.images, args.seed)
    write_json(args.out, metrics)
    if args.grid:
        write_bytes(args.grid, png(image_grid(images)))
    for kind, entry in metrics["kinds"].items():
        for method in metrics["methods"]:
            s = entry[method]["success"]
            print(
                f"{kind:15s} {method:6s} success {s['mean']:.3f} "
                f"[{s['lo']:.3f}, {s['hi']:.3f}] n={s['n']}"
            )
    return metrics


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy evaluate", lambda: main(args))
