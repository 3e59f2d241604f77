"""Helpers the Snakefile and the DVC pipeline share: which config keys each step reads.

`STEP_PARAMS` lists, per workflow step, the config keys (dotted; a section name stands for the
whole section) whose change must re-run that step. Snakemake rules declare them as `params`
(a changed value re-runs the rule) and dvc.yaml lists the same keys as key-level `params`; a
test checks that the two agree.
"""

from __future__ import annotations

import copy
from pathlib import Path

from sepen.config import read_yaml, validate_config

_PLAN = [
    "experiment",
    "evaluation.prompts",
    "evaluation.prompt_file",
    "evaluation.concept_file",
    "toy.concepts",
    "toy.held_out_pairs",
    "toy.split_seed",
]
_SAMPLING = ["sampling.steps", "sampling.guidance_scale", "sampling.dtype"]

STEP_PARAMS: dict[str, list[str]] = {
    "concepts": _PLAN,
    "prompts": _PLAN
    + [
        "evaluation.sets",
        "evaluation.images_per_prompt",
        "evaluation.seed",
        "evaluation.model_singles",
        "finetune.mode",
        "finetune.single_template",
    ],
    "toy_pretrain": [
        "toy.concepts",
        "toy.held_out_pairs",
        "toy.split_seed",
        "toy.radius",
        "toy.pair_fraction",
        "toy.one_name_fraction",
        "toy.model",
        "toy.pretrain",
        *_SAMPLING,
    ],
    "toy_card": [
        "model",
        *_PLAN[4:],
        "toy.card",
        "finetune.resolutions",
        "finetune.token_aggregation",
        "evaluation.attend_excite",
        *_SAMPLING,
    ],
    "finetune": ["model", "finetune", *_SAMPLING],
    "sample": ["model", "evaluation.shards", "evaluation.attend_excite", *_SAMPLING],
    "metrics": ["evaluation.metrics"],
    "aggregate": [
        "evaluation.bootstrap",
        "evaluation.methods",
        "evaluation.shards",
        "evaluation.attend_excite.sets",
    ],
    "fid": ["evaluation.fid"],
    "toy_premise": [
        "model",
        "toy.premise_images",
        "finetune.resolutions",
        "finetune.token_aggregation",
        "finetune.enhance_kernel",
        "evaluation.bootstrap",
        *_SAMPLING,
    ],
    "toy_study": ["toy.study", "model", "finetune", *_SAMPLING],
    "report_table": ["report.anchors"],
    "report_landing": [],
    "report_grid": [
        "report.grid_prompts",
        "report.grid_seeds",
        "evaluation.methods",
        "evaluation.shards",
    ],
    "report_losses": [],
    "report_taxonomy": [],
    "report_attention": [
        "model",
        "report.attention_prompts",
        "report.attention_steps",
        "finetune.resolutions",
        "finetune.token_aggregation",
        "sampling.guidance_scale",
    ],
}


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def step_params(config: dict, step: str) -> dict:
    """{dotted key: value} of the keys `step` reads (its Snakemake params)."""
    return {k: get_key(config, k) for k in STEP_PARAMS[step]}


def _relative(path) -> str:
    import os

    rel = os.path.relpath(str(path))
    return str(path) if rel.startswith("..") else rel


def command_config_path(workflow, config: dict, results_dir: str) -> str:
    """The config file the `sepen` commands of a Snakemake run read.

    The config file given (--configfile, else the Snakefile's configfile) when the workflow's
    config is exactly that file; with `--config` overrides or several config files, the merged
    config written to <results_dir>/config.merged.yaml (rewritten only when it changes, so it
    triggers nothing by itself).
    """
    import yaml

    files = [_relative(f) for f in (workflow.overwrite_configfiles or [])] or ["config/config.yaml"]
    if len(files) == 1 and Path(files[0]).is_file():
        try:
            from_file = validate_config(read_yaml(Path(files[0]).read_text()) or {})
        except ValueError:
            from_file = None
        if from_file == config:
            return files[0]
    merged = Path(results_dir) / "config.merged.yaml"
    text = yaml.safe_dump(copy.deepcopy(config), sort_keys=False)
    if not merged.is_file() or merged.read_text() != text:
        merged.parent.mkdir(parents=True, exist_ok=True)
        merged.write_text(text)
    return str(merged)
