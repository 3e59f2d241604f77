"""`sepen metrics`: per-image metrics of one sampling shard, one JSON per shard."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sepen.artifacts import read_manifest
from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.metrics import build_metrics, model_record, shard_metrics
from sepen.pipelines import device_and_dtype
from sepen.plan import read_plan

log = logging.getLogger("sepen.metrics")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen metrics", "Per-image metrics of one sampling shard.", True)
    p.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    p.add_argument(
        "--manifest", type=Path, required=True, help="a shard manifest of `sepen sample`"
    )
    p.add_argument("--out", type=Path, required=True, help="the shard's metrics (JSON)")
    return p


def main(args: argparse.Namespace) -> list[dict]:
    config = config_from(args)
    plan = read_plan(args.plan)
    manifest = read_manifest(args.manifest)
    names = config["evaluation"]["metrics"]
    shard = manifest["shard"]
    metrics = build_metrics(names, config, device_and_dtype(config["sampling"], shard)[0])
    rows = shard_metrics(manifest, plan, metrics)
    write_json(
        args.out,
        {
            "method": manifest["method"],
            "shard": manifest["shard"],
            "metrics": names,
            "models": model_record(config, names),
            "rows": rows,
        },
    )
    log.info("%d images scored with %s", len(rows), names)
    return rows


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen metrics", lambda: main(args))
