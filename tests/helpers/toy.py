"""Tiny toy-world settings and config files for the tests."""

from pathlib import Path

import yaml

# A toy-world model small enough to pretrain in seconds (sepen.toy).
TINY_TOY = {
    "toy": {
        "model": {"channels": [8, 16, 16], "text_width": 16, "vae_channels": 8},
        "pretrain": {
            "vae_steps": 2,
            "steps": 3,
            "batch_size": 4,
            "validation_images": 0,
            "warmup_steps": 1,
        },
    }
}


def write_toy_config(path: Path, model, **finetune) -> Path:
    """A config file for the tiny toy model: 2 sampling steps, 2 joint finetuning steps."""
    ft = {"mode": "joint", "image_size": 32, "steps": 2, "batch_size": 2, **finetune}
    config = {
        **TINY_TOY,
        "model": {"pretrained": str(model)},
        "sampling": {"steps": 2, "guidance_scale": 2.0},
        "finetune": ft,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def toy_experiment(tmp_path: Path, model, batch_size: int = 3, bootstrap: int = 100, **ft):
    """Config file, plan file and folders of a 2-prompt x 2-seed toy experiment."""
    from sepen.atomic import write_json
    from sepen.config import load_config
    from sepen.plan import build_plan

    config = {
        **TINY_TOY,
        "experiment": "t",
        "model": {"pretrained": str(model)},
        "sampling": {"steps": 2, "guidance_scale": 2.0, "batch_size": batch_size},
        "evaluation": {
            "prompts": "toy",
            "sets": ["held_out_pairs"],
            "images_per_prompt": 2,
            "metrics": ["toy_detection"],
            "bootstrap": bootstrap,
        },
        "toy": {**TINY_TOY["toy"], "held_out_pairs": 2},
        "finetune": {"mode": "joint", "image_size": 32, "steps": 2, "batch_size": 2, **ft},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    plan = build_plan(load_config(cfg))
    plan_path = write_json(tmp_path / "prompts.json", plan)
    return {"config": cfg, "plan": plan, "plan_path": plan_path, "dir": tmp_path, "model": model}
