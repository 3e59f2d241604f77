"""The premise check (`sepen toy premise`): does each object token attend to its own object,
and does SepEn's
loss on the base model's maps predict which images fail?

Measured on the model's own samples, as a person would look at them: every multi-object prompt
of the plan is sampled with its seeds while the cross-attention maps of its concept tokens are
averaged over the denoising steps (`sepen.sampling.sample_with_maps`); the exact detector then
finds the objects in the generated image, and each found object's mask splits its token's map
into own-object, other-object and background shares. The same per-image maps give SepEn's
separate and enhance values; their ROC AUC against the detector's failures (with a bootstrap
CI) tests the method's premise: that the maps' overlap and weakness are what make images fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sepen.architecture import text_positions
from sepen.losses import enhance_loss, separate_loss
from sepen.models import load_pipeline
from sepen.pipelines import DeltaSwitcher, prompts_by_delta
from sepen.sampling import sample_with_maps
from sepen.stats import auc_ci, bootstrap_ci
from sepen.toy.detect import regions, score_regions
from sepen.toy.evaluate import to_uint8
from sepen.toy.grounding import cell_fractions

VALUES = ("separate", "enhance", "total")


def object_masks(found, named: Sequence[str]) -> list[np.ndarray | None]:
    """Per named concept, the union of its detected objects' masks (None when not found)."""
    out = []
    for concept in named:
        masks = [r.mask for r in found if r.concept == concept and r.counts]
        out.append(np.logical_or.reduce(masks) if masks else None)
    return out


def attention_shares(maps: np.ndarray, masks: Sequence[np.ndarray | None]) -> list[dict | None]:
    """Where each concept's attention goes, for the concepts whose object was found.

    maps: (N, h, w) attention of the N concepts' tokens (any scale); masks: per concept an
    image-sized boolean mask or None. Each map is normalised to sum 1 and split into the share
    on its own object, on the other named objects and on the rest (background). `area` is the
    own object's share of the image, the own share a uniform map would get.
    """
    side = maps.shape[-1]
    fractions = [None if m is None else cell_fractions(m, side) for m in masks]
    out: list[dict | None] = []
    for i, own in enumerate(fractions):
        if own is None:
            out.append(None)
            continue
        m = maps[i] / maps[i].sum()
        others = [f for j, f in enumerate(fractions) if j != i and f is not None]
        other = np.clip(sum(others), 0, 1) if others else np.zeros_like(own)
        own_share = float((m * own).sum())
        other_share = float((m * np.clip(other - own, 0, 1)).sum())
        out.append(
            {
                "own": own_share,
                "other": other_share,
                "background": 1.0 - own_share - other_share,
                "area": float(own.mean()),
            }
        )
    return out


def loss_values(maps: np.ndarray, kernel: str = "authors") -> dict[str, float]:
    """SepEn's separate and enhance values (and separate + enhance / 2) of one image's maps."""
    import torch

    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None, :, None]  # (1, N, 1, h, w)
    sep = float(separate_loss(t))
    enh = float(enhance_loss(t, kernel=kernel))
    return {"separate": sep, "enhance": enh, "total": sep + 0.5 * enh}


def image_record(image: np.ndarray, maps: np.ndarray, named: Sequence[str], kernel: str) -> dict:
    """Detector outcome, attention shares and loss values of one generated image."""

    found = regions(image)
    return {
        "success": score_regions(found, named)["success"],
        "shares": attention_shares(maps, object_masks(found, named)),
        **loss_values(maps, kernel),
    }


def summarise(records: Sequence[dict], n_boot: int = 2000) -> dict:
    """Mean shares with bootstrap CIs over found objects, and the AUC of each loss value
    for predicting failure (1 - success) over images (None when every image fails or passes)."""

    shares = [s for r in records for s in r["shares"] if s is not None]
    out: dict = {"images": len(records), "objects_found": len(shares)}
    for key in ("own", "other", "background", "area"):
        out[key] = bootstrap_ci([s[key] for s in shares], n_boot=n_boot) if shares else None
    failed = [1.0 - r["success"] for r in records]
    out["failures"] = int(sum(failed))
    both = 0 < sum(failed) < len(failed)
    out["auc"] = {
        v: (auc_ci([r[v] for r in records], failed, n_boot=n_boot) if both else None)
        for v in VALUES
    }
    return out


def measure(pipe, plan: dict, prompt_ids: Sequence[str], seeds, config: dict) -> list[dict]:
    """One record per (prompt, seed): sample with the maps, detect, measure."""

    sp, ft = config["sampling"], config["finetune"]
    items = [(pid, s) for pid in prompt_ids for s in seeds]
    prompts = [plan["prompts"][pid]["prompt"] for pid, _ in items]
    named = [plan["prompts"][pid]["concepts"] for pid, _ in items]
    positions = [text_positions(pipe, p, c) for p, c in zip(prompts, named)]
    images, maps = sample_with_maps(
        pipe,
        prompts,
        positions,
        [s for _, s in items],
        sp["steps"],
        sp["guidance_scale"],
        ft,
        sp["batch_size"],
        ft["token_aggregation"],
        desc="premise",
    )
    return [
        {"prompt_id": pid, "seed": s, **image_record(im, m, c, ft["enhance_kernel"])}
        for (pid, s), im, m, c in zip(items, to_uint8(images), maps, named)
    ]


def premise_check(config: dict, plan: dict, model: str, model_dir: Path | None) -> dict:
    """Per method (base, and sepen with each prompt's delta) and pair set: the summary."""

    n = config["toy"]["premise_images"]
    seeds = plan["seeds"][:n]
    sets = {
        name: ids
        for name, ids in plan["sets"].items()
        if ids and all(len(plan["prompts"][p]["concepts"]) > 1 for p in ids)
    }
    pipe = load_pipeline(model)
    switcher = DeltaSwitcher(pipe)
    methods = ["base"] + (["sepen"] if model_dir is not None else [])
    n_boot = config["evaluation"]["bootstrap"]
    out: dict = {"images_per_prompt": len(seeds), "methods": {}}
    for method in methods:
        by_set = {}
        for name, ids in sets.items():
            records = []
            for delta, group in prompts_by_delta(plan, method, ids, model_dir).items():
                switcher.use(delta)
                records += measure(pipe, plan, group, seeds, config)
            by_set[name] = summarise(records, n_boot)
        out["methods"][method] = by_set
    switcher.use(None)
    return out
