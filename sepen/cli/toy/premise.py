"""`sepen toy premise`: the premise check - attention shares on the detected objects of
sampled images, before and after finetuning, and the AUC of SepEn's values for failure."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import add_deprecated, command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.plan import read_plan
from sepen.toy.premise import premise_check


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen toy premise", "The premise check on sampled images.", True)
    p.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    p.add_argument("--model", help="the toy base model folder (default: model.pretrained)")
    p.add_argument("--deltas-dir", type=Path, help="folder of the SepEn deltas (the plan's models)")
    add_deprecated(p, "--model-dir", "--deltas-dir", "deltas_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="premise.json")
    return p


def main(args: argparse.Namespace) -> dict:
    config = config_from(args)
    if config["toy"]["premise_images"] < 1:
        raise SepenError("toy.premise_images is 0: set it to 1 or more to run the check")
    plan = read_plan(args.plan)
    folder = args.deltas_dir
    if folder is not None:
        missing = sorted(
            str(folder / f"{m}.safetensors")
            for m in plan["models"]
            if not (folder / f"{m}.safetensors").is_file()
        )
        if missing:
            raise SepenError(f"deltas missing: {missing[:3]}: run `sepen finetune` for them")
    model = args.model or config["model"]["pretrained"]
    result = premise_check(config, plan, model, folder)
    write_json(args.out, result)
    return result


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen toy premise", lambda: main(args))
