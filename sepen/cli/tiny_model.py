"""`sepen tiny-model`: save a tiny random-weight pipeline (SD 1.x, SDXL, SD3, SD3.5-style or
FLUX.1 layout; the real CLIP tokenizer, an in-memory T5 tokenizer) for smoke runs and tests."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.command import command_parser, config_from, run_step
from sepen.models.tiny import save_tiny_pipeline
from sepen.models.tiny_mmdit import save_tiny_mmdit_pipeline

KINDS = ("sd", "sdxl", "sd3", "sd35", "flux")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "sepen tiny-model",
        "Save a tiny random-weight pipeline (real CLIP tokenizer; SD3 and FLUX.1 with a small "
        "in-memory T5 tokenizer) for smoke runs and tests. A given --config is validated (the "
        "pipeline takes no setting from it).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to save_pretrained into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--sample-size", type=int, default=16, help="latent side (image = 8x; sd and sdxl)"
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="sd",
        help="the layout: SD 1.x, SDXL, SD3, SD3.5 (RMSNorm, dual attention) or FLUX.1",
    )
    p.add_argument("--sdxl", action="store_true", help="the same as --kind sdxl")
    return p


def main(args: argparse.Namespace) -> None:
    if args.config is not None or args.set:
        config_from(args)
    kind = "sdxl" if args.sdxl else args.kind
    if kind in ("sd", "sdxl"):
        save_tiny_pipeline(
            args.out, seed=args.seed, sdxl=kind == "sdxl", sample_size=args.sample_size
        )
    else:
        save_tiny_mmdit_pipeline(args.out, kind, seed=args.seed)
    print(args.out)


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen tiny-model", lambda: main(args))
