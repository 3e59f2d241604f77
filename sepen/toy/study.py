"""The settings study (`sepen toy study`): base model vs SepEn over a grid of settings, on the
toy world.

Each cell is a set of config overrides (per-pair or joint finetuning, learning rate, steps,
norm loss, training signal, ...). For every finetuning seed of `toy.study.seeds` the cell's plan
is built as the workflow builds it (`sepen.plan`: one model per pair prompt, or one joint
model), each of its models is finetuned (`sepen finetune --plan --model-id` in a subprocess),
and every prompt of the evaluated sets is sampled with its own delta and the same seeds as the
base model, then scored by the exact detector. Differences to the base model are paired, with
bootstrap 95% CIs per finetuning seed; the spread over seeds is shown beside their mean.
Writes `study.json` and a Markdown table `study.md`; finished deltas are reused on a re-run.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from sepen.atomic import write_json, write_text
from sepen.config import load_config
from sepen.errors import ConfigError
from sepen.models import load_pipeline
from sepen.pipelines import DeltaSwitcher, prompts_by_delta
from sepen.plan import build_plan
from sepen.stats import bootstrap_ci, format_ci, paired_difference
from sepen.toy.evaluate import generate, image_scores

log = logging.getLogger("sepen.toy.study")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def read_grid(path: Path) -> list[dict]:
    """Cells of a study grid file: a list of {name, set: {config.key: value}}."""
    cells = yaml.safe_load(Path(path).read_text())
    if not isinstance(cells, list) or not cells:
        raise ConfigError(f"study grid {str(path)!r} must be a non-empty list of cells")
    for cell in cells:
        name = cell.get("name", "") if isinstance(cell, dict) else ""
        if not NAME.match(str(name)) or name == "base":
            raise ConfigError(
                f"study cell name {name!r} in {str(path)!r} must use letters, digits, '.', '_' "
                f"or '-' and not be 'base'"
            )
        if not isinstance(cell.get("set", {}), dict):
            raise ConfigError(f"study cell {name!r}: 'set' must map config keys to values")
    if len({c["name"] for c in cells}) != len(cells):
        raise ConfigError(f"study grid {str(path)!r} repeats a cell name")
    return cells


def overrides(cell: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in cell.get("set", {}).items()]


def finetune_model(
    config_path: Path, argv_set: list[str], plan_path: Path, model_id: str, folder: Path
) -> Path:
    """One model of a cell's plan (reused when its delta exists)."""
    delta = folder / f"{model_id}.safetensors"
    if delta.is_file():
        return delta
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "sepen", "finetune", "--config", str(config_path), "--cpu"]
    for o in argv_set:
        argv += ["--set", o]
    argv += ["--plan", str(plan_path), "--model-id", model_id, "--out", str(delta)]
    with open(folder / f"{model_id}.log", "w") as logfile:
        subprocess.run(argv, stdout=logfile, stderr=subprocess.STDOUT, check=True)
    return delta


def cell_plan(base_plan: dict, cell_config: dict) -> dict:
    """The plan of one study cell over the study's prompts and seeds.

    A per-pair cell has its own plan, which must evaluate the same prompts; a joint cell draws
    every prompt of the study's plan (per-pair model singles included) with its one model.
    """
    import copy

    plan = build_plan(cell_config)
    if plan["seeds"] != base_plan["seeds"]:
        raise ConfigError("a study cell changes the evaluated seeds: cells may change finetuning")
    if cell_config["finetune"]["mode"] == "joint":
        out = copy.deepcopy(base_plan)
        out["models"] = plan["models"]
        for entry in out["prompts"].values():
            entry["model"] = "joint"
        return out
    if plan["order"] != base_plan["order"]:
        raise ConfigError(
            "a study cell changes the evaluated prompts or seeds: cells may change "
            "finetuning, not evaluation"
        )
    return plan


def sample_plan(pipe, plan: dict, model_dir: Path | None, sampling: dict) -> dict[str, list]:
    """Per prompt set, the exact detector's rows of every (prompt, seed) in plan order; each
    prompt sampled with its own delta from `model_dir` (None: the base model)."""

    switcher = DeltaSwitcher(pipe)
    method = "base" if model_dir is None else "sepen"
    rows: dict[str, dict] = {}
    for delta, ids in prompts_by_delta(plan, method, plan["order"], model_dir).items():
        switcher.use(delta)
        items = [(pid, s) for pid in ids for s in plan["seeds"]]
        entries = [plan["prompts"][pid] for pid, _ in items]
        images = generate(
            pipe,
            [e["prompt"] for e in entries],
            [s for _, s in items],
            sampling["steps"],
            sampling["guidance_scale"],
            sampling["batch_size"],
        )
        for item, row in zip(items, image_scores(images, [e["concepts"] for e in entries])):
            rows[item] = row
    switcher.use(None)
    return {
        name: [rows[(pid, s)] for pid in ids for s in plan["seeds"]]
        for name, ids in plan["sets"].items()
    }


def summarise_cell(runs: dict[int, dict], base: dict, n_boot: int) -> dict:
    """Per set: each finetuning seed's rates and paired differences to base, and across
    seeds the mean difference with its spread (min, max)."""
    out = {}
    for name, base_rows in base.items():
        per_seed = {}
        for seed, rows in runs.items():
            entry = {
                k: bootstrap_ci([r[k] for r in rows[name]], n_boot=n_boot) for k in rows[name][0]
            }
            entry["minus_base"] = {
                k: paired_difference(
                    [r[k] for r in rows[name]], [r[k] for r in base_rows], n_boot=n_boot
                )
                for k in rows[name][0]
            }
            per_seed[str(seed)] = entry
        diffs = [v["minus_base"]["success"]["mean"] for v in per_seed.values()]
        out[name] = {
            "seeds": per_seed,
            "success_change": {
                "mean": float(np.mean(diffs)),
                "min": float(np.min(diffs)),
                "max": float(np.max(diffs)),
                "n_seeds": len(diffs),
            },
        }
    return out


def run_study(
    config_path: Path,
    grid: Path,
    out_dir: Path,
    overrides_: list[str] | None = None,
) -> dict:

    config = load_config(config_path, overrides_)
    cells = read_grid(grid)
    seeds = config["toy"]["study"]["seeds"]
    base_plan = build_plan(config)
    runs = []
    for cell in cells:  # every cell's settings and plan are checked before any work
        for seed in seeds:
            argv_set = list(overrides_ or []) + overrides(cell) + [f"finetune.seed={seed}"]
            cell_config = load_config(config_path, argv_set)
            try:
                plan = cell_plan(base_plan, cell_config)
            except ConfigError as err:
                raise ConfigError(f"study cell {cell['name']!r}: {err}") from err
            runs.append((cell, seed, argv_set, cell_config, plan))
    n_boot = config["evaluation"]["bootstrap"]
    pipe = load_pipeline(config["model"]["pretrained"])
    base = sample_plan(pipe, base_plan, None, config["sampling"])
    study: dict = {
        "images_per_prompt": len(base_plan["seeds"]),
        "seeds": seeds,
        "cells": cells,
        "base": {
            name: {k: bootstrap_ci([r[k] for r in rows], n_boot=n_boot) for k in rows[0]}
            for name, rows in base.items()
        },
        "results": {},
    }
    by_cell: dict[str, dict] = {}
    for cell, seed, argv_set, cell_config, plan in runs:
        folder = out_dir / cell["name"] / f"seed-{seed}"
        plan_path = write_json(folder / "prompts.json", plan)
        for model_id in plan["models"]:
            finetune_model(config_path, argv_set, plan_path, model_id, folder)
        by_cell.setdefault(cell["name"], {})[seed] = sample_plan(
            pipe, plan, folder, cell_config["sampling"]
        )
        log.info("cell %s seed %d done", cell["name"], seed)
    for name, cell_runs in by_cell.items():
        study["results"][name] = summarise_cell(cell_runs, base, n_boot)
    write_json(out_dir / "study.json", study)
    write_text(out_dir / "study.md", markdown_table(study))
    return study


def markdown_table(study: dict) -> str:
    """One row per cell: per evaluated set, the base rate, and per finetuning seed the paired
    change in success with its CI, then the mean change over seeds with its range."""
    sets = list(study["base"])
    head = ["cell", "settings"] + [f"{s}: change per seed [95% CI]; mean (range)" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = ["base", "-"] + [f"success {format_ci(study['base'][s]['success'])}" for s in sets]
    lines.append("| " + " | ".join(base) + " |")
    for cell in study["cells"]:
        result = study["results"][cell["name"]]
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cell.get("set", {}).items())
        row = [cell["name"], settings or "-"]
        for s in sets:
            r = result[s]
            seeds = "; ".join(format_ci(v["minus_base"]["success"]) for v in r["seeds"].values())
            c = r["success_change"]
            row.append(f"{seeds}; mean {c['mean']:+.3f} ({c['min']:+.3f} to {c['max']:+.3f})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
