"""`sepen toy test-time`: the test-time settings study - base vs Attend-and-Excite and SepEn
at test time over a grid of settings, on the held-out pairs and card seeds (sepen.toy.
test_time_study); writes JSON and a Markdown table."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.atomic import write_json, write_text
from sepen.command import command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.toy.study import read_grid
from sepen.toy.test_time_study import study_markdown, test_time_study


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy test-time", "Test-time settings on the toy world's card seeds.")
    p.add_argument("--model", type=Path, help="toy base model folder (default: model.pretrained)")
    p.add_argument(
        "--cells", type=Path, required=True, help="YAML list of cells: name, method, set"
    )
    p.add_argument("--images", type=int, default=8, help="card seeds per held-out pair")
    p.add_argument("--out", type=Path, required=True, help="the study (JSON); .md beside it")
    return p


def main(args: argparse.Namespace) -> dict:
    if args.images < 1:
        raise SepenError(f"--images {args.images}: give 1 or more images per pair")
    cells = read_grid(args.cells)
    config = config_from(args)
    model = str(args.model or config["model"]["pretrained"])
    if not (Path(model) / "model_index.json").is_file():
        raise SepenError(
            f"model {model!r} is not a toy pipeline folder (no model_index.json): give a "
            "folder made by `sepen toy pretrain`"
        )
    study = test_time_study(args.config, list(args.set or []), cells, model, args.images)
    write_json(args.out, study)
    write_text(args.out.with_suffix(".md"), study_markdown(study))
    return study


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy test-time", lambda: main(args))
