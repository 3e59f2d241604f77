import subprocess
import sys
from pathlib import Path

import pytest

from sepen.__main__ import main
from sepen.config import load_config, validate_config
from sepen.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_command_exits_2_and_lists_the_commands(capsys):
    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fly'" in err and "finetune" in err and "tiny-model" in err
    assert main(["toy", "fly"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fly'" in err and "diagnose" in err and "card" in err


def test_tiny_model_step_then_finetune_from_the_console_script(tmp_path):
    model = tmp_path / "model"
    assert main(["tiny-model", "--out", str(model)]) == 0
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    done = subprocess.run(
        [
            "sepen",
            "finetune",
            "--config",
            str(ROOT / "config/tiny.yaml"),
            "--model",
            str(model),
            "--set",
            "finetune.steps=2",
            "--out",
            str(tmp_path / "d.safetensors"),
            "--cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "d.safetensors").stat().st_size > 0


@pytest.mark.parametrize(
    "path, mode",
    [
        ("config/tiny.yaml", "pairs"),
        ("config/sd14_pairs.yaml", "pairs"),
        ("config/sd21_pairs.yaml", "pairs"),
        ("config/sd14_joint.yaml", "joint"),
        ("config/config.yaml", "pairs"),
        ("config/toy_v2.yaml", "pairs"),
        ("config/test/smoke.yaml", "joint"),
    ],
)
def test_shipped_configs_validate(path, mode):
    assert load_config(ROOT / path)["finetune"]["mode"] == mode


@pytest.mark.parametrize(
    "path",
    [
        "config/config.yaml",
        "config/toy_v2.yaml",
        "config/toy_mmdit.yaml",
        "config/toy_mmdit_v7.yaml",
        "config/toy_mmdit_v6.yaml",
        "config/toy_mmdit_v1.yaml",
    ],
)
def test_shipped_toy_models_match_their_configs(path):
    import json

    from sepen.toy.pretrain import prepare_world, world_settings

    config = load_config(ROOT / path)
    summary = json.loads((ROOT / config["model"]["pretrained"] / "sepen_toy.json").read_text())
    toy = prepare_world(config)
    assert summary["held_out_pairs"] == toy.held_out_pairs
    assert summary["config"] == world_settings(toy)  # every setting the model depends on


def test_config_defaults_are_the_papers_per_pair_settings():
    ft = validate_config({})["finetune"]
    assert (ft["steps"], ft["batch_size"], ft["learning_rate"]) == (200, 4, 2e-6)
    assert (ft["lambda_sep"], ft["lambda_en"], ft["lambda_norm"]) == (1.0, 0.5, 0.5)
    assert (ft["weight_decay"], ft["max_grad_norm"], ft["resolutions"]) == (0.01, 1.0, [16])


def test_wrong_config_type_names_the_key():
    with pytest.raises(ConfigError, match=r"finetune.batch_size = 'four' is invalid"):
        validate_config({"finetune": {"batch_size": "four"}})
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "sepen", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "finetune" in done.stdout
