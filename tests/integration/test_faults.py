"""Faults: a save cut short, a diverging run, file modes, no debris after bad finetuning input
(every command's bad input: test_bad_input.py)."""

import csv
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from helpers.toy import toy_experiment
from safetensors.torch import load_file

from sepen.atomic import write_json
from sepen.cli.finetune import main, parse_args
from sepen.finetune.state import checkpoint_problem

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture()
def setup(tmp_path, tiny_toy_model):
    """A tiny toy experiment (config, plan and folders) that checkpoints every 2 of 6 steps."""
    return toy_experiment(
        tmp_path,
        tiny_toy_model,
        batch_size=4,
        bootstrap=50,
        concepts=["circle", "square", "star", "ring"],
        steps=6,
        checkpointing_steps=2,
        checkpoints_total_limit=3,
        log_every=1,
    )


def _finetune(setup, out, *extra):
    argv = ["--config", str(setup["config"]), "--out", str(out), "--cpu", *map(str, extra)]
    return main(parse_args(argv))


# ---------------------------------------------------------------- 1. a save cut short


def test_a_checkpoint_cut_short_is_skipped_and_the_resume_recovers(setup, caplog):
    d = setup["dir"]
    whole = load_file(str(_finetune(setup, d / "a.safetensors")))
    _finetune(setup, d / "b.safetensors", "--stop-after", 4)
    state = d / "b.state"
    assert sorted(p.name for p in state.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # the fault: the newest checkpoint's weights truncated, as a job killed while writing them
    # (before saves went through a hidden folder) left them; and a hidden folder of a save cut
    # short now
    weights = state / "checkpoint-4" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "cannot be read" in checkpoint_problem(state / "checkpoint-4")
    partial = state / ".checkpoint-6.tmp"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\x00" * 10)
    with caplog.at_level("WARNING"):
        resumed = load_file(str(_finetune(setup, d / "b.safetensors", "--resume", "latest")))
    assert "skipping" in caplog.text and "checkpoint-4" in caplog.text
    assert not partial.exists()
    assert sorted(whole) == sorted(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_checkpoint_is_visible_only_when_complete(setup, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def killed_after_writing(self, output_dir=None, **kwargs):
        real(self, output_dir, **kwargs)
        raise KeyboardInterrupt("killed while saving")  # before the folder is renamed

    monkeypatch.setattr(Accelerator, "save_state", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        _finetune(setup, setup["dir"] / "c.safetensors")
    state = setup["dir"] / "c.state"
    assert not list(state.glob("checkpoint-*"))
    assert [p.name for p in state.glob(".checkpoint-*")] == [".checkpoint-2.tmp"]


# ---------------------------------------------------------------- 2. a diverging run


def test_a_diverging_run_stops_with_one_line_and_keeps_no_non_finite_checkpoint(setup):
    out = setup["dir"] / "d.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "sepen", "finetune", "--config", str(setup["config"])]
        + ["--set", "finetune.learning_rate=1e12", "--out", str(out), "--cpu"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("sepen finetune: error:")]
    assert len(line) == 1
    assert "diverged at step" in line[0] and "not finite (loss parts loss " in line[0]
    assert "finetune.learning_rate (now 1e+12" in line[0] and "mixed_precision" in line[0]
    assert not out.exists()
    for folder in (setup["dir"] / "d.state").glob("checkpoint-*"):
        assert checkpoint_problem(folder) is None  # every kept checkpoint is finite


def test_a_run_that_diverges_after_a_checkpoint_keeps_that_checkpoint_and_resumes_from_it(
    setup, monkeypatch
):
    """Weights made non-finite by the 3rd optimizer step (injected): the run stops at step 3,
    before any later save; checkpoint-2, the last finite one, stays and a resume starts there."""
    from sepen.errors import SepenError

    real, calls = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = setup["dir"] / "d.safetensors"
    with pytest.raises(SepenError, match="diverged at step 3: the trained weights are not finite"):
        _finetune(setup, out)
    state = setup["dir"] / "d.state"
    assert [p.name for p in state.glob("checkpoint-*")] == ["checkpoint-2"]
    assert checkpoint_problem(state / "checkpoint-2") is None and not out.exists()
    assert not list(state.glob(".checkpoint-*"))
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert _finetune(setup, out, "--resume", "latest") == out
    with open(state / "losses.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 3. file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_results_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    from sepen.delta import save_delta

    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "m.json", {"a": 1})
        delta = save_delta(
            tmp_path / "d.safetensors",
            {"w": torch.ones(2)},
            base_model="x",
            revision=None,
            trainable="to_k",
            config={},
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(delta.stat().st_mode) == mode
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- 4. debris


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.templates=['a photo of a {}']", "has 1 '{}' slots for 2 concepts"),
        ("finetune.concepts=[circle, unicorn]", "concept 'unicorn' is not in the vocabulary"),
        ("finetune.resolutions=[5]", "no cross-attention layer at resolution [5]"),
    ],
)
def test_bad_finetune_input_leaves_no_state_folder(setup, capsys, override, message):
    from sepen.cli.finetune import cli

    out = setup["dir"] / "e.safetensors"
    code = cli(["--config", str(setup["config"]), "--set", override, "--out", str(out), "--cpu"])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not (setup["dir"] / "e.state").exists()
