"""The test-time settings study (`sepen toy test-time`): base model vs a grid of test-time
cells (Attend-and-Excite, SepEn at test time with its choices), on the toy world's held-out
pairs and card seeds, which no reported number uses (sepen.toy.seeds).

Each cell is a method and config overrides (`read_grid`'s format: name, set, plus `method`).
Every cell samples the same prompts and seeds as the base model; success differences are paired
per image, with bootstrap 95% CIs; the cost is the cell's images per second beside the base
model's. Writes the study as JSON and a Markdown table.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from sepen.config import load_config
from sepen.errors import ConfigError
from sepen.models import load_pipeline
from sepen.stats import bootstrap_ci, format_ci, paired_difference
from sepen.test_time import METHODS, GuidanceMethod
from sepen.toy.evaluate import generate, image_scores, to_uint8
from sepen.toy.seeds import seed_range
from sepen.toy.study import overrides
from sepen.toy.world import prepare_world, prompt_for

log = logging.getLogger("sepen.toy.test_time")


def check_cells(cells: list[dict]) -> None:
    for cell in cells:
        if cell.get("method") not in METHODS:
            raise ConfigError(
                f"test-time cell {cell['name']!r}: method {cell.get('method')!r} is not one of "
                f"{METHODS}"
            )


def _success(rows) -> list[float]:
    return [r["success"] for r in rows]


def test_time_study(
    config_path, base_overrides: list[str], cells: list[dict], model: str, images: int
) -> dict:
    """Base vs every cell on the held-out pairs, `images` card seeds each (module doc)."""
    check_cells(cells)
    config = load_config(config_path, base_overrides)
    toy = prepare_world(config)
    seeds = seed_range(toy["card"]["seed"], images)
    held = [list(p) for p in toy.held_out_pairs]
    entries = [{"prompt": prompt_for(p), "concepts": p} for p in held for _ in seeds]
    all_seeds = [s for _ in held for s in seeds]
    named = [e["concepts"] for e in entries]
    sp = config["sampling"]
    pipe = load_pipeline(model)
    start = time.perf_counter()
    base = image_scores(
        generate(
            pipe,
            [e["prompt"] for e in entries],
            all_seeds,
            sp["steps"],
            sp["guidance_scale"],
            sp["batch_size"],
            "test-time study: base",
        ),
        named,
    )
    base_rate = len(entries) / (time.perf_counter() - start)
    out: dict = {
        "model": model,
        "seeds": [seeds[0], seeds[-1]],
        "pairs": len(held),
        "base": {"success": bootstrap_ci(_success(base)), "images_per_s": base_rate},
        "cells": {},
    }
    for cell in cells:
        cfg = load_config(config_path, base_overrides + overrides(cell))
        method = GuidanceMethod.from_config(cell["method"], cfg)
        method.check(pipe)
        positions = method.positions(pipe, entries)
        stats: dict = {}
        start = time.perf_counter()
        ims = []
        batch = cfg["sampling"]["batch_size"]
        for lo in range(0, len(entries), batch):
            sl = slice(lo, lo + batch)
            ims.append(
                method.sample(
                    pipe,
                    entries[sl],
                    positions[sl],
                    all_seeds[sl],
                    sp["guidance_scale"],
                    stats=stats,
                )  # fmt: skip
            )
        elapsed = time.perf_counter() - start
        rows = image_scores(to_uint8(np.concatenate(ims)), named)
        out["cells"][cell["name"]] = {
            "method": cell["method"],
            "set": cell.get("set", {}),
            "success": bootstrap_ci(_success(rows)),
            "minus_base": paired_difference(_success(rows), _success(base)),
            "images_per_s": len(entries) / elapsed,
            "guided_passes_per_image": stats["guided_passes"] / len(entries),
        }
        log.info(
            "%s: success %.3f, minus base %+.3f, %.2f images/s",
            cell["name"],
            out["cells"][cell["name"]]["success"]["mean"],
            out["cells"][cell["name"]]["minus_base"]["mean"],
            len(entries) / elapsed,
        )
    return out


def study_markdown(study: dict) -> str:
    """The study as a Markdown table: each cell's success, paired lift and cost."""
    base = study["base"]
    lines = [
        f"Held-out pairs ({study['pairs']}), card seeds {study['seeds'][0]}-{study['seeds'][1]}: "
        f"base success {format_ci(base['success'])}, {base['images_per_s']:.2f} images/s.",
        "",
        "| cell | method | settings | success | minus base | images/s | x base time | "
        "guided passes / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in study["cells"].items():
        settings = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in c["set"].items()) or "-"
        lines.append(
            f"| {name} | {c['method']} | {settings} | {format_ci(c['success'])} | "
            f"{format_ci(c['minus_base'], signed=True)} | {c['images_per_s']:.2f} | "
            f"{base['images_per_s'] / c['images_per_s']:.1f} | "
            f"{c['guided_passes_per_image']:.1f} |"
        )
    return "\n".join(lines) + "\n"
