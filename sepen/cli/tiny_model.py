"""`sepen tiny-model`: save a tiny random-weight Stable Diffusion pipeline (SD 1.x or SDXL
layout, the real CLIP tokenizer) for smoke runs and tests."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.command import command_parser, config_from, run_step
from sepen.models.tiny import save_tiny_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "sepen tiny-model",
        "Save a tiny random-weight Stable Diffusion pipeline (real CLIP tokenizer) for smoke "
        "runs and tests. A given --config is validated (the pipeline takes no setting from it).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to save_pretrained into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--sample-size", type=int, default=16, help="latent side (image = 8x)")
    p.add_argument("--sdxl", action="store_true", help="Stable Diffusion XL's layout")
    return p


def main(args: argparse.Namespace) -> None:
    if args.config is not None or args.set:
        config_from(args)
    save_tiny_pipeline(args.out, seed=args.seed, sdxl=args.sdxl, sample_size=args.sample_size)
    print(args.out)


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen tiny-model", lambda: main(args))
