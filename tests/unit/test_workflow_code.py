"""The step table's code dependencies and the generated workflow files: each step's code is
its command's import closure within sepen (plus the schema); every rule carries its hash and
every DVC stage lists its files; dvc.yaml and the reference pages are what the generator
writes."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sepen.dvc_pipeline import dvc_yaml_text
from sepen.workflow import STEP_COMMANDS, STEP_PARAMS, code_hash, module_closure, step_code

ROOT = Path(__file__).resolve().parents[2]


def steps_reading(file: str) -> set[str]:
    return {s for s in STEP_COMMANDS if file in step_code(s)}


def test_every_step_has_a_command_and_params():
    assert set(STEP_COMMANDS) == set(STEP_PARAMS)


def test_the_loss_module_is_code_of_the_steps_that_compute_the_losses_only():
    # finetuning, the premise check, and sampling and the card (SepEn at test time, A&E's smoothing)
    loss_steps = {"finetune", "toy_premise", "sample", "toy_card"}
    assert steps_reading("sepen/losses.py") == loss_steps
    assert steps_reading("sepen/objective.py") == {"finetune"}


def test_report_modules_are_code_of_the_report_steps_only():
    report = {s for s in STEP_COMMANDS if s.startswith("report_")}
    for name in ("tables", "figures", "attention_maps"):
        assert steps_reading(f"sepen/report/{name}.py") == report, name


def test_every_step_reads_the_schema_and_lazy_imports_count():
    for step in STEP_COMMANDS:
        assert "sepen/schemas/config.schema.yaml" in step_code(step)
    # sepen.cli.finetune -> sepen.finetune.loop -> sepen.objective -> sepen.losses
    assert "sepen.losses" in module_closure("sepen.cli.finetune")
    assert "sepen.finetune" in module_closure("sepen.cli.finetune")  # the package's __init__


def test_every_rule_carries_its_steps_code_hash():
    rules = {}
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:    .*\n|\n)+)", smk.read_text(), re.M):
            rules[name] = body
    assert set(rules) == set(STEP_COMMANDS)
    for name, body in rules.items():
        assert f'code=code_hash("{name}")' in body, name


def test_a_code_edit_changes_the_hash_of_exactly_the_steps_that_import_it(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "sepen", copy / "sepen", ignore=shutil.ignore_patterns("__pycache__"))
    script = "import json; from sepen.workflow import STEP_COMMANDS, code_hash; "
    script += "print(json.dumps({s: code_hash(s) for s in STEP_COMMANDS}))"

    def hashes():
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=copy, capture_output=True, text=True, check=True
        )
        return yaml.safe_load(done.stdout)

    before = hashes()
    assert before == {s: code_hash(s) for s in STEP_COMMANDS}  # the copy hashes like the tree
    with open(copy / "sepen/losses.py", "a") as f:
        f.write("\n# an edit\n")
    after = hashes()
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {"finetune", "toy_premise", "sample", "toy_card"}


def test_committed_dvc_yaml_is_what_the_generator_writes(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml_text("config/config.yaml")


def test_each_dvc_stage_lists_its_steps_code_and_params(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        assert set(step_code(name)) <= set(stage["deps"]), name
        keys = stage.get("params", [{}])[0].get("config/config.yaml", [])
        assert keys == STEP_PARAMS[name], name


def test_every_param_dvc_reads_is_written_out_in_the_default_config():
    """DVC reads key-level params from the file itself, not the schema's defaults."""
    written = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        for key in stage.get("params", [{}])[0].get("config/config.yaml", []):
            node = written
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: {key}"
                node = node[part]


@pytest.mark.parametrize("part", ["dvc-yaml", "docs"])
def test_the_check_of_the_generated_files_passes_and_fails_on_drift(part, tmp_path, monkeypatch):
    from sepen.__main__ import main

    monkeypatch.chdir(ROOT)
    assert main(["workflow", part, "--check"]) == 0
    out = ["--out", str(tmp_path / "dvc.yaml")] if part == "dvc-yaml" else []
    out = out or ["--out-dir", str(tmp_path)]
    assert main(["workflow", part, "--check", *out]) == 2  # nothing there yet
    assert main(["workflow", part, *out]) == 0
    assert main(["workflow", part, "--check", *out]) == 0
