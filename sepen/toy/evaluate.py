"""Sampling toy images and scoring them with the exact detector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sepen.delta import apply_delta
from sepen.models import load_pipeline
from sepen.sampling import sample
from sepen.stats import bootstrap_ci, paired_difference
from sepen.toy.detect import regions, score_regions
from sepen.toy.world import prepare_world, prompt_for


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    batch_size: int = 32,
    desc: str | None = None,
) -> np.ndarray:
    """uint8 images (n, h, w, 3), image i from prompt i with its own seeded generator."""
    return to_uint8(sample(pipe, prompts, seeds, steps, guidance, batch_size, "np", desc))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as uint8, rounded as PNG files store them."""
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def image_scores(images: np.ndarray, named: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """Per-image outcomes and failure taxonomy from the exact detector (`score_regions`)."""
    return [score_regions(regions(im), names) for im, names in zip(images, named)]


def rates(rows: list[dict[str, float]]) -> dict[str, dict]:
    """Each outcome's rate over images with its bootstrap 95% CI."""
    return {k: bootstrap_ci([r[k] for r in rows]) for k in rows[0]}


def score(images: np.ndarray, named: Sequence[Sequence[str]]) -> dict[str, dict]:
    """Rates with bootstrap 95% CIs over images: success, hit_rate, spurious, exact_count."""
    return rates(image_scores(images, named))


def prompt_kinds(toy: dict) -> dict[str, list[list[str]]]:
    """The concept lists evaluated: single objects, trained pairs, held-out pairs."""
    return {
        "single": [[c] for c in toy["concepts"]],
        "trained_pairs": toy.trained_pairs,
        "held_out_pairs": toy.held_out_pairs,
    }


def evaluation_prompts(toy: dict, n_images: int, seed: int = 0) -> dict[str, list[list[str]]]:
    """Named concepts of each evaluation image, by kind; every option gets its share."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, options in prompt_kinds(toy).items():
        named = [list(options[i % len(options)]) for i in range(n_images)]
        out[kind] = [named[i] for i in rng.permutation(n_images)]
    return out


def sample_and_score(pipe, named: dict[str, list[list[str]]], sampling: dict, seed: int = 0):
    """Per-image scores and images of one method, by kind; image i of a kind has seed + i."""

    rows, images = {}, {}
    for kind, concepts in named.items():
        ims = generate(
            pipe,
            [prompt_for(c) for c in concepts],
            list(range(seed, seed + len(concepts))),
            sampling["steps"],
            sampling["guidance_scale"],
            sampling["batch_size"],
            desc=f"sampling {kind}",
        )
        rows[kind], images[kind] = image_scores(ims, concepts), ims
    return rows, images


def compare(rows: dict[str, dict[str, list]]) -> dict:
    """Rates per method and kind, and the paired difference of each method to 'base'."""

    out = {}
    for kind in rows["base"]:
        entry = {m: rates(r[kind]) for m, r in rows.items()}
        for m, r in rows.items():
            if m != "base":
                entry[f"{m}_minus_base"] = {
                    k: paired_difference(
                        [x[k] for x in r[kind]], [x[k] for x in rows["base"][kind]]
                    )
                    for k in r[kind][0]
                }
        out[kind] = entry
    return out


def evaluate(
    config: dict, model: str, delta: str | None, n_images: int, seed: int = 0
) -> tuple[dict, dict[str, np.ndarray]]:
    """Base (and SepEn) rates on single objects, trained pairs and held-out pairs.

    Every method samples the same prompts with the same seeds, so differences are paired.
    Returns the metrics and the images by '<method>/<kind>'.
    """

    toy = prepare_world(config)
    methods = {"base": load_pipeline(model)}
    if delta:
        methods["sepen"] = load_pipeline(model)
        apply_delta(methods["sepen"], delta)
    named = evaluation_prompts(toy, n_images, seed)
    rows, images = {}, {}
    for method, pipe in methods.items():
        rows[method], ims = sample_and_score(pipe, named, config["sampling"], seed)
        images.update({f"{method}/{kind}": v for kind, v in ims.items()})
    metrics: dict = {"n_images": n_images, "methods": list(methods), "kinds": compare(rows)}
    return metrics, images


def image_grid(images: dict[str, np.ndarray], per_row: int = 8, scale: int = 4) -> np.ndarray:
    """Rows of the first `per_row` images of each '<method>/<kind>' entry, side by side."""
    rows = [np.concatenate(list(v[:per_row]), axis=1) for v in images.values()]
    grid = np.concatenate(rows, axis=0)
    return grid.repeat(scale, 0).repeat(scale, 1)
