import json

import pytest
import yaml

from sepen.errors import ConfigError
from sepen.report.tables import study_rows
from sepen.toy.study import markdown_table, read_grid, run_study


@pytest.mark.parametrize(
    "grid, message",
    [
        ([], "must be a non-empty list"),
        ([{"name": "a b"}], "study cell name 'a b'"),
        ([{"name": "base"}], "study cell name 'base'"),
        ([{"name": "x"}, {"name": "x"}], "repeats a cell name"),
        ([{"name": "x", "set": [1]}], "'set' must map config keys"),
    ],
)
def test_bad_grid_is_rejected(tmp_path, grid, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=message):
        read_grid(path)


def test_markdown_table_shows_each_seeds_change_and_the_spread():
    def ci(mean):
        return {"mean": mean, "lo": mean - 0.1, "hi": mean + 0.1, "n": 10}

    seeds = {
        "0": {"success": ci(0.7), "minus_base": {"success": ci(0.2)}},
        "1": {"success": ci(0.8), "minus_base": {"success": ci(0.3)}},
    }
    study = {
        "base": {"held_out_pairs": {"success": ci(0.5)}},
        "cells": [{"name": "s", "set": {"finetune.learning_rate": 1e-4}}],
        "results": {
            "s": {
                "held_out_pairs": {
                    "seeds": seeds,
                    "success_change": {"mean": 0.25, "min": 0.2, "max": 0.3, "n_seeds": 2},
                }
            }
        },
    }
    lines = markdown_table(study).splitlines()
    assert lines[2] == "| base | - | success 0.500 [0.400, 0.600] |"
    assert lines[3] == (
        "| s | learning_rate=0.0001 | 0.200 [0.100, 0.300]; 0.300 [0.200, 0.400]; "
        "mean +0.250 (+0.200 to +0.300) |"
    )
    rows = study_rows(study)  # the same study in the report's table
    assert rows[1] == ["base", "-", "0.500 [0.400, 0.600]", "", ""]
    assert rows[2] == [
        "s",
        "learning_rate=0.0001",
        "0.700 [0.600, 0.800]; 0.800 [0.700, 0.900]",
        "0.200 [0.100, 0.300]; 0.300 [0.200, 0.400]",
        "+0.250 (+0.200 to +0.300)",
    ]


def test_summarise_cell_pairs_each_seed_with_base_and_gives_the_spread():
    from sepen.toy.study import summarise_cell

    def rows(values):
        return [{"success": float(v)} for v in values]

    base = {"held_out_pairs": rows([0, 0, 1, 1])}
    runs = {0: {"held_out_pairs": rows([1, 0, 1, 1])}, 1: {"held_out_pairs": rows([1, 1, 1, 1])}}
    out = summarise_cell(runs, base, n_boot=100)["held_out_pairs"]
    assert out["seeds"]["0"]["minus_base"]["success"]["mean"] == 0.25
    assert out["seeds"]["1"]["minus_base"]["success"]["mean"] == 0.5
    assert out["seeds"]["1"]["success"]["mean"] == 1.0
    assert out["success_change"] == {"mean": 0.375, "min": 0.25, "max": 0.5, "n_seeds": 2}


@pytest.mark.parametrize("mode", [pytest.param("joint", marks=pytest.mark.slow), "pairs"])
def test_study_finetunes_every_model_of_a_cell_per_seed_and_reuses_them(
    tmp_path, tiny_toy_model, mode
):
    from helpers.toy import write_toy_config

    config = write_toy_config(
        tmp_path / "c.yaml",
        tiny_toy_model,
        concepts=["circle", "square", "star"],
        resolutions=[16],
    )
    data = yaml.safe_load(config.read_text())
    data["toy"]["concepts"] = ["circle", "square", "star"]
    data["toy"]["held_out_pairs"] = 1
    data["toy"]["study"] = {"seeds": [0, 1]}
    data["evaluation"] = {"prompts": "toy", "images_per_prompt": 2, "bootstrap": 50}
    data["evaluation"]["sets"] = ["single", "held_out_pairs"]
    config.write_text(yaml.safe_dump(data))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": "c", "set": {"finetune.mode": mode}}]))
    study = run_study(config, grid, tmp_path / "study")
    result = study["results"]["c"]
    assert set(result) == {"single", "held_out_pairs"}
    assert set(result["held_out_pairs"]["seeds"]) == {"0", "1"}
    assert result["held_out_pairs"]["success_change"]["n_seeds"] == 2
    if mode == "pairs":  # single-object prompts have no pair model: drawn by the base model
        assert result["single"]["success_change"] == {
            "mean": 0.0,
            "min": 0.0,
            "max": 0.0,
            "n_seeds": 2,
        }
    deltas = sorted((tmp_path / "study" / "c").rglob("*.safetensors"))
    assert len(deltas) == 2  # one model (joint, or the one held-out pair) per seed
    stamps = [d.stat().st_mtime_ns for d in deltas]
    run_study(config, grid, tmp_path / "study")
    assert [d.stat().st_mtime_ns for d in deltas] == stamps  # finished models are reused
    assert json.loads((tmp_path / "study" / "study.json").read_text())["seeds"] == [0, 1]


def test_a_study_cell_may_not_change_what_is_evaluated(tmp_path, tiny_toy_model):
    from helpers.toy import write_toy_config

    config = write_toy_config(tmp_path / "c.yaml", tiny_toy_model, resolutions=[16])
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": "c", "set": {"evaluation.images_per_prompt": 3}}]))
    with pytest.raises(ConfigError, match="changes the evaluated"):
        run_study(config, grid, tmp_path / "study")


def test_evaluate_rejects_a_non_positive_image_count(tmp_path, capsys):
    from sepen.cli.toy.evaluate import cli

    code = cli(["--model", str(tmp_path / "m"), "--images", "0", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--images 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pretrain_rejects_an_unknown_concept_before_training(tmp_path, capsys):
    from sepen.cli.toy.pretrain import cli

    code = cli(["--set", "toy.concepts=[circle, unicorn, star]", "--out", str(tmp_path / "m")])
    assert code == 2
    assert "config key toy.concepts.1 = 'unicorn' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_pretrain_replaces_an_existing_model_folder(tiny_toy_model, tmp_path):
    import shutil

    from helpers.toy import TINY_TOY

    from sepen.config import validate_config
    from sepen.toy.pretrain import pretrain

    out = tmp_path / "m"
    shutil.copytree(tiny_toy_model, out)
    (out / "stale.txt").write_text("from an older run")
    pretrain(validate_config(TINY_TOY), out, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
