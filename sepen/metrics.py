"""Per-image metrics of sampled images (`sepen metrics` writes one JSON per shard).

Each metric is a function (images, prompts) -> per-image dicts of named values; the registry
`METRICS` maps config names (evaluation.metrics) to them. Values are per image so that
aggregation can bootstrap and pair them across methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sepen.errors import SepenError
from sepen.evaluators import build, preflight
from sepen.toy.detect import regions, score_regions

log = logging.getLogger("sepen.metrics")


def toy_detection(images: Sequence, prompts: Sequence[dict], vocabularies=None) -> list[dict]:
    """The toy world's exact detector: success, hit_rate, spurious, exact_count per image, and
    the failure taxonomy (fail_missing, fail_too_small, fail_merged, fail_wrong_shape,
    fail_spurious: 1 when a named object fails that way, or a failing image shows an unnamed
    concept)."""

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
