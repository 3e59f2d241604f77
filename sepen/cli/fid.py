"""`sepen fid`: FID of a method's images (all its shards) against reference images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm.auto import tqdm

from sepen.artifacts import read_manifest
from sepen.atomic import write_json
from sepen.command import command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.evaluators.fid import InceptionFeatures, fid, reference_images
from sepen.metrics import load_image
from sepen.pipelines import device_and_dtype

log = logging.getLogger("sepen.metrics")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen fid", "FID of a method's images against reference images.", True)
    p.add_argument(
        "--manifests", type=Path, nargs="+", required=True, help="the method's shard manifests"
    )
    p.add_argument("--out", type=Path, required=True, help="the FID (JSON)")
    return p


def main(args: argparse.Namespace) -> dict:
    """FID of one method's images (all its shards) against evaluation.fid.reference."""
    config = config_from(args)
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


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen fid", lambda: main(args))
