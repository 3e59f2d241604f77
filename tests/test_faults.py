"""Faults and bad input: a save cut short, a diverging run, file modes, debris, and every
step's bad inputs (exit status 2, one line naming the value and the fix, nothing written)."""

import csv
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_TOY
from safetensors.torch import load_file

from sepen.atomic import write_json
from sepen.cli.finetune import main, parse_args
from sepen.config import load_config
from sepen.finetune.state import checkpoint_problem
from sepen.plan import build_plan

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture()
def setup(tmp_path, tiny_toy_model):
    """A tiny toy experiment: config, plan and folders."""
    config = {
        **TINY_TOY,
        "experiment": "t",
        "model": {"pretrained": str(tiny_toy_model)},
        "sampling": {"steps": 2, "guidance_scale": 2.0, "batch_size": 4},
        "evaluation": {
            "prompts": "toy",
            "sets": ["held_out_pairs"],
            "images_per_prompt": 2,
            "metrics": ["toy_detection"],
            "bootstrap": 50,
        },
        "toy": {**TINY_TOY["toy"], "held_out_pairs": 2},
        "finetune": {
            "mode": "joint",
            "concepts": ["circle", "square", "star", "ring"],
            "image_size": 32,
            "steps": 6,
            "batch_size": 2,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": 3,
            "log_every": 1,
        },
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    plan_path = write_json(tmp_path / "prompts.json", build_plan(load_config(cfg)))
    return {"config": cfg, "plan": plan_path, "dir": tmp_path, "model": tiny_toy_model}


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


# ---------------------------------------------------------------- the bad-input matrix


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _bad(setup, case):
    """(argv after `sepen`, the value the message must name, the output that must not appear)."""
    d, cfg, plan = setup["dir"], str(setup["config"]), str(setup["plan"])
    not_json = _write(d / "bad" / "notjson.json", "{not json")
    foreign = _write(d / "bad" / "foreign.json", json.dumps({"hello": 1}))
    out = d / "out" / "result.json"
    sample = ["sample", "--config", cfg, "--method", "base", "--images-dir", str(d / "imgs")]
    metrics = ["metrics", "--config", cfg, "--plan", plan, "--out", str(out)]
    aggregate = ["aggregate", "--config", cfg, "--plan", plan, "--out", str(out)]
    table = ["report", "table", "--out", str(out)]
    if case == "prompts: missing concepts file":
        argv = ["prompts", "--config", cfg, "--concepts", str(d / "none.json"), "--out", str(out)]
        return argv, "none.json", out
    if case == "prompts: concepts file of another kind":
        argv = ["prompts", "--config", cfg, "--concepts", str(foreign), "--out", str(out)]
        return argv, "foreign.json", out
    if case == "prompts: an empty prompt set":
        prompts = _write(
            d / "bad" / "ae.yaml",
            yaml.safe_dump({"vocabulary": {"animals": ["cat", "dog"]}, "prompts": {"animals": []}}),
        )
        concepts = _write(
            d / "bad" / "c.json",
            json.dumps(
                {"source": "attend_excite", "concepts": ["cat", "dog"], "splits": {"seen": []}}
            ),
        )
        argv = ["prompts", "--config", cfg, "--set", "evaluation.prompts=attend_excite"]
        argv += ["--set", f"evaluation.prompt_file={prompts}", "--set", "evaluation.sets=[]"]
        return argv + ["--concepts", str(concepts), "--out", str(out)], "'animals'", out
    if case == "finetune: missing plan":
        argv = ["finetune", "--config", cfg, "--plan", str(d / "none.json"), "--model-id", "joint"]
        return argv + ["--out", str(d / "out" / "d.safetensors"), "--cpu"], "none.json", out.parent
    if case == "finetune: plan of another kind":
        argv = ["finetune", "--config", cfg, "--plan", str(foreign), "--model-id", "joint"]
        return (
            argv + ["--out", str(d / "out" / "d.safetensors"), "--cpu"],
            "foreign.json",
            out.parent,
        )
    if case == "finetune: unknown model id":
        argv = ["finetune", "--config", cfg, "--plan", plan, "--model-id", "nope"]
        return argv + ["--out", str(d / "out" / "d.safetensors"), "--cpu"], "'nope'", out.parent
    if case == "sample: missing plan":
        return [*sample, "--plan", str(d / "none.json"), "--out", str(out)], "none.json", out
    if case == "sample: plan that is not JSON":
        return [*sample, "--plan", str(not_json), "--out", str(out)], "notjson.json", out
    if case in (
        "sample: missing delta",
        "sample: corrupt delta",
        "sample: pickled delta",
        "sample: delta of another base model",
    ):
        models = d / "models"
        delta = models / "joint.safetensors"
        if case == "sample: corrupt delta":
            _write(delta, os.urandom(256))
        elif case == "sample: pickled delta":
            models.mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.ones(2)}, delta)
        elif case == "sample: delta of another base model":
            from sepen.delta import save_delta

            save_delta(
                delta,
                {"w": torch.ones(2)},
                base_model="CompVis/stable-diffusion-v1-4",
                revision=None,
                trainable="to_k",
                config={},
            )
        argv = ["sample", "--config", cfg, "--plan", plan, "--method", "sepen"]
        argv += ["--images-dir", str(d / "imgs"), "--deltas-dir", str(models), "--out", str(out)]
        return argv, "joint.safetensors", out
    if case == "metrics: missing manifest":
        return [*metrics, "--manifest", str(d / "none.json")], "none.json", out
    if case == "metrics: manifest of another kind":
        return [*metrics, "--manifest", str(foreign)], "foreign.json", out
    if case in ("metrics: missing image", "metrics: corrupt PNG"):
        image = d / "imgs" / "x" / "seed-00000.png"
        if case == "metrics: corrupt PNG":
            _write(image, b"\x89PNG\r\n\x1a\n" + os.urandom(64))
        pid = json.loads(setup["plan"].read_text())["order"][0]
        manifest = _write(
            d / "bad" / "m.json",
            json.dumps(
                {
                    "method": "base",
                    "shard": 0,
                    "shards": 1,
                    "images": [{"prompt_id": pid, "seed": 0, "path": str(image)}],
                }
            ),
        )
        return [*metrics, "--manifest", str(manifest)], "seed-00000.png", out
    if case == "aggregate: missing metrics file":
        return [*aggregate, "--metrics", str(d / "none.json")], "none.json", out
    if case == "aggregate: metrics file that is not JSON":
        return [*aggregate, "--metrics", str(not_json)], "notjson.json", out
    if case == "fid: missing reference folder":
        argv = ["fid", "--config", cfg, "--set", f"evaluation.fid.reference={d / 'real'}"]
        return argv + ["--manifests", str(foreign), "--out", str(out)], "real", out
    if case == "report: missing metrics file":
        return [*table, "--metrics", str(d / "none.json")], "none.json", out
    if case == "report: metrics file of another kind":
        return [*table, "--metrics", str(foreign)], "foreign.json", out
    if case == "report: taxonomy without the toy detector's metrics":
        metrics_file = _write(
            d / "bad" / "agg.json",
            json.dumps({"methods": ["base"], "metrics": ["clip_full"], "sets": {}}),
        )
        return (
            ["report", "taxonomy", "--metrics", str(metrics_file), "--out", str(out)],
            "toy_detection",
            out,
        )
    if case == "premise: missing plan":
        argv = ["toy", "premise", "--config", cfg, "--plan", str(d / "none.json")]
        return argv + ["--out", str(out)], "none.json", out
    if case == "premise: missing deltas":
        argv = ["toy", "premise", "--config", cfg, "--plan", plan]
        argv += ["--deltas-dir", str(d / "nomodels"), "--out", str(out)]
        return argv, "joint.safetensors", out
    raise AssertionError(case)


# each case and the fix its one line must name (the step that writes the file, the option or
# the key to give)
CASES = {
    "prompts: missing concepts file": "run `sepen concepts` first",
    "prompts: concepts file of another kind": "give the file `sepen concepts` writes",
    "prompts: an empty prompt set": "give it prompts or leave it out of the file",
    "finetune: missing plan": "run `sepen prompts` first",
    "finetune: plan of another kind": "give the file `sepen prompts` writes",
    "finetune: unknown model id": "give one of its models ['joint']",
    "sample: missing plan": "run `sepen prompts` first",
    "sample: plan that is not JSON": "write it again with `sepen prompts`",
    "sample: missing delta": "run `sepen finetune` for them",
    "sample: corrupt delta": "write it again with `sepen finetune`",
    "sample: pickled delta": "write it again with `sepen finetune`",
    "sample: delta of another base model": "sample it with --model CompVis/stable-diffusion-v1-4",
    "metrics: missing manifest": "run `sepen sample` first",
    "metrics: manifest of another kind": "give the file `sepen sample` writes",
    "metrics: missing image": "re-run `sepen sample` for this shard",
    "metrics: corrupt PNG": (
        "re-run `sepen sample` for its shard, which generates unreadable images again"
    ),
    "aggregate: missing metrics file": "run `sepen metrics` first",
    "aggregate: metrics file that is not JSON": "write it again with `sepen metrics`",
    "fid: missing reference folder": "set evaluation.fid.reference to a folder of real images",
    "report: missing metrics file": "run `sepen aggregate` first",
    "report: metrics file of another kind": "give the file `sepen aggregate` writes",
    "report: taxonomy without the toy detector's metrics": "use toy_detection",
    "premise: missing plan": "run `sepen prompts` first",
    "premise: missing deltas": "run `sepen finetune` for them",
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(setup, capsys, case):
    from sepen.__main__ import main as sepen

    argv, named, output = _bad(setup, case)
    before = {p for p in setup["dir"].rglob("*")}
    assert sepen(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert named in errors[0], errors[0]
    assert errors[0].endswith(CASES[case]) or f"{CASES[case]} (" in errors[0], errors[0]
    assert not output.exists()
    assert {p for p in setup["dir"].rglob("*")} == before  # nothing written, no debris
