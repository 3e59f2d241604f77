"""`sepen aggregate`: per-prompt, per-set and overall metrics with bootstrap 95% CIs and
paired differences to the base model."""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.aggregate import (
    aggregate,
    collect,
    dvc_metrics,
    sampling_cost,
    summary_rows,
    write_csv,
)
from sepen.artifacts import read_json, read_manifest, read_metrics, shard_files
from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.plan import read_plan


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen aggregate", __doc__.split(": ", 1)[1].split(" and paired")[0], True)
    p.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--metrics", type=Path, nargs="+", help="metric files of the shards")
    which.add_argument(
        "--metrics-dir",
        type=Path,
        help="folder of <method>/shard-<k>.json for the config's methods and shards",
    )
    p.add_argument("--fid", type=Path, nargs="*", default=[], help="FID files of `sepen fid`")
    p.add_argument(
        "--samples-dir",
        type=Path,
        help="folder of <method>/shard-<k>.json sampling manifests: the sampling cost per method",
    )
    p.add_argument("--out", type=Path, required=True, help="full results (JSON)")
    p.add_argument("--dvc-metrics", type=Path, help="compact means for `dvc metrics` (JSON)")
    p.add_argument("--table", type=Path, help="flat table for `dvc plots` (CSV)")
    return p


def main(args: argparse.Namespace) -> dict:
    config = config_from(args)
    plan = read_plan(args.plan)
    ev = config["evaluation"]
    files = args.metrics or shard_files(args.metrics_dir, ev["methods"], ev["shards"])
    shards = [read_metrics(p) for p in files]
    result = aggregate(plan, collect(shards), ev["bootstrap"], ev["attend_excite"]["sets"])
    result["models"] = next((s["models"] for s in shards if s.get("models")), {})
    if args.samples_dir is not None:
        paths = shard_files(args.samples_dir, ev["methods"], ev["shards"])
        result["sampling_cost"] = sampling_cost([read_manifest(p) for p in paths])
    for path in args.fid:
        entry = read_json(path, "FID file", "sepen fid", ("method", "fid"))
        result.setdefault("fid", {})[entry["method"]] = entry
    write_json(args.out, result)
    if args.dvc_metrics:
        write_json(args.dvc_metrics, dvc_metrics(result))
    if args.table:
        write_csv(args.table, summary_rows(result))
    return result


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen aggregate", lambda: main(args))
