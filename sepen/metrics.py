"""`sepen metrics`: per-image metrics of one sampling shard, one JSON per shard.

Each metric is a function (images, prompts) -> per-image dicts of named values; the registry
`METRICS` maps config names (evaluation.metrics) to them. Values are per image so that
aggregation can bootstrap and pair them across methods.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sepen.artifacts import read_manifest
from sepen.atomic import write_json
from sepen.command import run_step, step_parser
from sepen.config import load_config
from sepen.errors import SepenError
from sepen.plan import read_plan

log = logging.getLogger("sepen.metrics")


def toy_detection(images: Sequence, prompts: Sequence[dict], vocabularies=None) -> list[dict]:
    """The toy world's exact detector: success, hit_rate, spurious, exact_count per image, and
    the failure taxonomy (fail_missing, fail_too_small, fail_merged, fail_wrong_shape,
    fail_spurious: 1 when a named object fails that way, or a failing image shows an unnamed
    concept)."""
    from sepen.toy.detect import regions, score_regions

    return [
        score_regions(regions(np.asarray(im.convert("RGB"))), p["concepts"])
        for im, p in zip(images, prompts)
    ]


NAMES = ("toy_detection", "clip", "blip", "detection")


def build_metrics(names: Sequence[str], config: dict, device: str = "cpu") -> dict[str, Callable]:
    """Each metric by name, models loaded once: f(images (PIL), prompts, vocabularies) -> rows."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise SepenError(f"unknown metrics {unknown}: choose from {list(NAMES)}")
    out: dict[str, Callable] = {}
    if "toy_detection" in names:
        out["toy_detection"] = toy_detection
    model_metrics = [n for n in names if n != "toy_detection"]
    if model_metrics:
        from sepen.evaluators import build, preflight

        preflight(config)
        out.update(build(model_metrics, config, device))
    return {n: out[n] for n in names}


def model_record(config: dict, names: Sequence[str]) -> dict:
    """Which models produced the numbers (kept beside them: detectors differ from the paper's)."""
    ev = config["evaluation"]
    out = {}
    if "clip" in names or "blip" in names:
        out["clip"] = f"{ev['clip']['model']}/{ev['clip']['pretrained']}"
    if "blip" in names:
        out["blip"] = ev["blip"]["model"]
    if "detection" in names:
        d = ev["detection"]
        out["detection"] = f"{d['detector']}:{d['model']} (threshold {d['threshold']})"
    return out


def set_vocabularies(plan: dict) -> dict[str, list[str]]:
    """Per prompt, the concepts of its prompt set (the detector's text queries)."""
    vocab: dict[str, list[str]] = {}
    for ids in plan["sets"].values():
        words = sorted({c for pid in ids for c in plan["prompts"][pid]["concepts"]})
        for pid in ids:
            vocab.setdefault(pid, words)
    return vocab


def load_image(path: str):
    """An image of a shard as RGB; an unreadable file is an error naming it and the fix."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise SepenError(
            f"image {str(path)!r} cannot be read ({err}): re-run `sepen sample` for its shard, "
            f"which generates unreadable images again"
        ) from err


def shard_metrics(
    manifest: dict, plan: dict, metrics: dict[str, Callable], batch: int = 256
) -> list[dict]:
    """Rows {prompt_id, seed, <metric values>} for every image of a shard's manifest."""
    missing = [im["path"] for im in manifest["images"] if not Path(im["path"]).is_file()]
    if missing:
        raise SepenError(
            f"{len(missing)} images of the manifest are missing (first: {missing[0]!r}): "
            f"re-run `sepen sample` for this shard"
        )
    vocab = set_vocabularies(plan)
    rows = []
    entries = manifest["images"]
    for lo in tqdm(range(0, len(entries), batch), desc="metrics", mininterval=10):
        chunk = entries[lo : lo + batch]
        images = [load_image(e["path"]) for e in chunk]
        prompts = [plan["prompts"][e["prompt_id"]] for e in chunk]
        vocabularies = [vocab[e["prompt_id"]] for e in chunk]
        values: list[dict] = [{} for _ in chunk]
        for metric in metrics.values():
            for v, r in zip(values, metric(images, prompts, vocabularies)):
                v.update(r)
        rows += [
            {"prompt_id": e["prompt_id"], "seed": e["seed"], **v} for e, v in zip(chunk, values)
        ]
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = step_parser("sepen metrics", __doc__.split("\n")[0])
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument(
        "--manifest", type=Path, required=True, help="a shard manifest of `sepen sample`"
    )
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:

    from sepen.sample import device_and_dtype

    config = load_config(args.config, args.set)
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
    args = parse_args(argv)
    return run_step("sepen metrics", lambda: main(args))


def fid_main(args: argparse.Namespace) -> dict:
    """FID of one method's images (all its shards) against evaluation.fid.reference."""

    from sepen.evaluators.fid import InceptionFeatures, fid, reference_images
    from sepen.sample import device_and_dtype

    config = load_config(args.config, args.set)
    spec = config["evaluation"]["fid"]
    if not spec["reference"]:
        raise SepenError("evaluation.fid.reference is not set: give a folder of real images")
    reference = reference_images(spec["reference"])
    manifests = [read_manifest(m) for m in args.manifests]
    methods = {m["method"] for m in manifests}
    if len(methods) != 1:
        raise SepenError(f"FID takes the shards of one method; got {sorted(methods)}")
    paths = [im["path"] for m in manifests for im in m["images"]]
    extract = InceptionFeatures(
        spec["weights"], device_and_dtype(config["sampling"])[0], spec["batch_size"]
    )
    ours = extract([load_image(p) for p in tqdm(paths, desc="fid images", mininterval=10)])
    real = extract([load_image(str(p)) for p in reference])
    result = {
        "method": methods.pop(),
        "fid": fid(ours, real),
        "n_images": len(paths),
        "n_reference": len(reference),
        "features": f"torchvision inception_v3 {spec['weights']} pool (not the TF-FID weights)",
    }
    write_json(args.out, result)
    return result


def fid_cli(argv=None) -> int:
    p = step_parser("sepen fid", "FID of a method's images against reference images.")
    p.add_argument("--manifests", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    return run_step("sepen fid", lambda: fid_main(args))
