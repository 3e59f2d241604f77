"""`sepen toy study`: base model vs SepEn over a grid of settings, on the toy world.

Each cell finetunes a delta (`sepen finetune` in a subprocess, settings as `--set` overrides),
samples the same prompts with the same seeds as the base model, and is scored by the exact
detector; differences to the base model are paired, with bootstrap 95% CIs. Writes
`study.json` and a Markdown table `study.md`; finished deltas are reused on a re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import yaml

from sepen.atomic import write_json, write_text
from sepen.config import load_config
from sepen.errors import ConfigError, SepenError

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


def finetune_cell(config_path: Path, cell: dict, folder: Path) -> Path:
    delta = folder / "delta.safetensors"
    if delta.is_file():
        log.info("cell %s: reusing %s", cell["name"], delta)
        return delta
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "sepen",
        "finetune",
        "--config",
        str(config_path),
        "--cpu",
        "--out",
        str(delta),
    ]
    for o in overrides(cell):
        argv += ["--set", o]
    log.info("cell %s: finetuning (%s)", cell["name"], " ".join(overrides(cell)) or "defaults")
    with open(folder / "finetune.log", "w") as logfile:
        subprocess.run(argv, stdout=logfile, stderr=subprocess.STDOUT, check=True)
    return delta


def markdown_table(results: dict, cells: list[dict], shares: dict) -> str:
    def ci(d):
        return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"

    def diff(kind, m):
        return "" if m == "base" else ci(kind[f"{m}_minus_base"]["success"])

    head = (
        "| cell | settings | held-out pairs | change vs base | trained pairs | "
        "change vs base | single objects | change vs base | own-object attention |"
    )
    lines = [head, "|" + "---|" * 9]
    held, trained, single = (results[k] for k in ("held_out_pairs", "trained_pairs", "single"))
    rows = [{"name": "base", "set": {}}] + cells
    for cell in rows:
        m = cell["name"]
        own = shares[m]["held_out_pairs"]["own"]
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cell.get("set", {}).items())
        lines.append(
            f"| {m} | {settings or '-'} | {ci(held[m]['success'])} | {diff(held, m)} | "
            f"{ci(trained[m]['success'])} | {diff(trained, m)} | {ci(single[m]['success'])} | "
            f"{diff(single, m)} | {own:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_study(
    config_path: Path,
    grid: Path,
    out_dir: Path,
    n_images: int,
    seed: int = 0,
    premise_scenes: int = 16,
    overrides_: list[str] | None = None,
) -> dict:
    from sepen.delta import apply_delta
    from sepen.models import load_pipeline
    from sepen.toy.evaluate import compare, evaluation_prompts, premise, sample_and_score
    from sepen.toy.pretrain import prepare_world

    config = load_config(config_path, overrides_)
    cells = read_grid(grid)
    for cell in cells:  # validate every cell's settings before any work
        load_config(config_path, list(overrides_ or []) + overrides(cell))
    toy = prepare_world(config)
    model = config["model"]["pretrained"]
    named = evaluation_prompts(toy, n_images, seed)
    base = load_pipeline(model)
    rows = {"base": sample_and_score(base, named, config["sampling"], seed)[0]}
    shares = {"base": premise(base, toy, premise_scenes)}
    for cell in cells:
        delta = finetune_cell(config_path, cell, out_dir / cell["name"])
        pipe = load_pipeline(model)
        apply_delta(pipe, delta)
        rows[cell["name"]] = sample_and_score(pipe, named, config["sampling"], seed)[0]
        shares[cell["name"]] = premise(pipe, toy, premise_scenes)
        log.info("cell %s done", cell["name"])
    results = compare(rows)
    study = {"n_images": n_images, "cells": cells, "results": results, "attention_share": shares}
    write_json(out_dir / "study.json", study)
    write_text(out_dir / "study.md", markdown_table(results, cells, shares))
    return study


def cli(argv=None) -> int:
    from sepen.logs import setup_logging

    p = argparse.ArgumentParser(prog="sepen toy study", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--grid", type=Path, required=True, help="YAML list of {name, set}")
    p.add_argument("--images", type=int, default=200, help="images per prompt kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--premise-scenes", type=int, default=16)
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    setup_logging()
    try:
        study = run_study(
            args.config,
            args.grid,
            args.out_dir,
            args.images,
            args.seed,
            args.premise_scenes,
            args.set,
        )
    except SepenError as err:
        print(f"sepen toy study: error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(study["results"], study["cells"], study["attention_share"]))
    return 0
