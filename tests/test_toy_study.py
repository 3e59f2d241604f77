import json

import pytest
import yaml

from sepen.errors import ConfigError
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


def test_markdown_table_shows_rates_and_paired_changes():
    def ci(mean):
        return {"success": {"mean": mean, "lo": mean - 0.1, "hi": mean + 0.1, "n": 10}}

    results = {
        kind: {"base": ci(0.5), "s": ci(0.7), "s_minus_base": ci(0.2)}
        for kind in ("held_out_pairs", "trained_pairs", "single")
    }
    shares = {m: {"held_out_pairs": {"own": 0.25}} for m in ("base", "s")}
    table = markdown_table(
        results, [{"name": "s", "set": {"finetune.learning_rate": 1e-4}}], shares
    )
    lines = table.splitlines()
    assert lines[2].startswith("| base | - | 0.500 [0.400, 0.600] |  |")
    assert lines[3].startswith(
        "| s | learning_rate=0.0001 | 0.700 [0.600, 0.800] | 0.200 [0.100, 0.300] |"
    )
    assert lines[3].endswith("| 0.250 |")


def test_study_runs_a_cell_and_reuses_its_delta(tmp_path, tiny_toy_model):
    from conftest import write_toy_config

    config = write_toy_config(
        tmp_path / "c.yaml",
        tiny_toy_model,
        concepts=["circle", "square", "star"],
        resolutions=[16],
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"name": "lr", "set": {"finetune.learning_rate": 1e-3}}]))
    study = run_study(config, grid, tmp_path / "study", n_images=2, premise_scenes=1)
    assert set(study["results"]) == {"single", "trained_pairs", "held_out_pairs"}
    assert "lr_minus_base" in study["results"]["held_out_pairs"]
    assert json.loads((tmp_path / "study" / "study.json").read_text())["n_images"] == 2
    assert "| lr | learning_rate=0.001 |" in (tmp_path / "study" / "study.md").read_text()
    delta = tmp_path / "study" / "lr" / "delta.safetensors"
    stamp = delta.stat().st_mtime_ns
    run_study(config, grid, tmp_path / "study", n_images=2, premise_scenes=1)
    assert delta.stat().st_mtime_ns == stamp  # finished cells are not trained again


def test_evaluate_rejects_a_non_positive_image_count(tmp_path, capsys):
    from sepen.toy.evaluate import cli

    code = cli(["--model", str(tmp_path / "m"), "--images", "0", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--images 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pretrain_rejects_an_unknown_concept_before_training(tmp_path, capsys):
    from sepen.toy.pretrain import cli

    code = cli(["--set", "toy.concepts=[circle, unicorn, star]", "--out", str(tmp_path / "m")])
    assert code == 2
    assert "config key toy.concepts.1 = 'unicorn' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_pretrain_replaces_an_existing_model_folder(tiny_toy_model, tmp_path):
    import shutil

    from conftest import TINY_TOY

    from sepen.config import validate_config
    from sepen.toy.pretrain import pretrain

    out = tmp_path / "m"
    shutil.copytree(tiny_toy_model, out)
    (out / "stale.txt").write_text("from an older run")
    pretrain(validate_config(TINY_TOY), out, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
