"""`sepen sample`: images of one method for one shard of the plan's prompts, resumable.

The images and their resumption are sepen.image_store's; the shard's manifest (JSON) lists
every image, how many were generated (written) in this run, how many were kept (`reused`), how
many were drawn and in how many seconds (the sampling cost the report shows per method).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import add_deprecated, command_parser, config_from, run_step
from sepen.delta import check_base_model
from sepen.errors import SepenError
from sepen.image_store import (
    draw_and_save,
    image_path,
    invalidate_if_changed,
    is_complete,
    settings_fingerprint,
)
from sepen.models import load_pipeline
from sepen.pipelines import DeltaSwitcher, delta_for, device_and_dtype, group_by, plan_items
from sepen.plan import read_plan
from sepen.sampling import sample
from sepen.test_time import METHODS as TEST_TIME_METHODS
from sepen.test_time import GuidanceMethod

log = logging.getLogger("sepen.sample")


def main(args: argparse.Namespace) -> dict:
    config = config_from(args)
    plan = read_plan(args.plan)
    if args.method not in config["evaluation"]["methods"]:
        raise SepenError(
            f"method {args.method!r} is not in evaluation.methods {config['evaluation']['methods']}"
        )
    if args.method == "sepen" and args.deltas_dir is None:
        raise SepenError("method 'sepen' needs --deltas-dir, the folder of the finetuned deltas")
    guided = (
        GuidanceMethod.from_config(args.method, config)
        if args.method in TEST_TIME_METHODS
        else None
    )
    items = plan_items(
        plan, args.shard, args.shards, args.method, config["evaluation"]["attend_excite"]["sets"]
    )
    deltas = {pid: delta_for(plan, args.method, pid, args.deltas_dir) for pid, _ in items}
    missing = sorted({str(d) for d in deltas.values() if d is not None and not d.is_file()})
    if missing:
        raise SepenError(f"finetuned deltas missing: {missing[:3]}: run `sepen finetune` for them")
    images_dir = Path(args.images_dir)
    model = args.model or config["model"]["pretrained"]
    for delta in sorted({str(d) for d in deltas.values() if d is not None}):
        check_base_model(delta, model)
    fingerprint = settings_fingerprint(config, model, args.method, deltas.values())
    if invalidate_if_changed(images_dir, fingerprint):
        log.warning("settings changed since the kept images were made: sampling them again")
    todo = [(pid, s) for pid, s in items if not is_complete(image_path(images_dir, pid, s))]
    log.info(
        "%s shard %d/%d: %d images, %d already there, %d to generate",
        args.method,
        args.shard,
        args.shards,
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    drawn, seconds = 0, 0.0
    if todo:
        device, dtype = device_and_dtype(config["sampling"], args.shard)
        pipe = load_pipeline(model, config["model"]["revision"], dtype=dtype, device=device)
        switcher = None
        sp = config["sampling"]
        if guided is not None:  # prompts batched across; each image with its own positions
            guided.check(pipe)
            entries = {pid: plan["prompts"][pid] for pid in dict.fromkeys(p for p, _ in items)}
            where = dict(zip(entries, guided.positions(pipe, list(entries.values()))))
            groups = {None: items}

            def draw(chunk):
                return guided.sample(
                    pipe,
                    [entries[pid] for pid, _ in chunk],
                    [where[pid] for pid, _ in chunk],
                    [s for _, s in chunk],
                    sp["guidance_scale"],
                )

        else:  # one delta at a time (per-pair models), prompts batched across
            switcher = DeltaSwitcher(pipe)
            groups = group_by(items, lambda item: deltas[item[0]])

            def draw(chunk):
                prompts = [plan["prompts"][pid]["prompt"] for pid, _ in chunk]
                seeds = [s for _, s in chunk]
                return sample(pipe, prompts, seeds, sp["steps"], sp["guidance_scale"], len(chunk))

        start = time.perf_counter()
        drawn = draw_and_save(
            groups,
            draw,
            lambda item: image_path(images_dir, *item),
            sp["batch_size"],
            f"sampling {args.method}",
            switcher,
            missing=set(todo),
        )
        seconds = time.perf_counter() - start
    manifest = {
        "method": args.method,
        "shard": args.shard,
        "shards": args.shards,
        "images_dir": str(images_dir),
        "generated": len(todo),
        "reused": len(items) - len(todo),
        "drawn": drawn,
        "seconds": round(seconds, 3),  # drawing time of this run (model loading excluded)
        "images": [
            {"prompt_id": pid, "seed": s, "path": str(image_path(images_dir, pid, s))}
            for pid, s in items
        ],
    }
    write_json(args.out, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen sample", __doc__.split("\n")[0].split(": ", 1)[1], True)
    p.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    p.add_argument("--method", required=True, help="one of evaluation.methods")
    p.add_argument("--shard", type=int, default=0, help="which shard (0-based)")
    p.add_argument("--shards", type=int, default=1, help="how many shards the prompts are in")
    p.add_argument("--model", help="base model folder or hub id (default: model.pretrained)")
    p.add_argument("--deltas-dir", type=Path, help="folder of <model id>.safetensors deltas")
    add_deprecated(p, "--model-dir", "--deltas-dir", "deltas_dir", type=Path)
    p.add_argument("--images-dir", type=Path, required=True, help="the shard's image folder")
    p.add_argument("--out", type=Path, required=True, help="the shard's manifest (JSON)")
    return p


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen sample", lambda: main(args))
