"""The bad-input matrix: every command's bad input exits with status 2 and one line that names
the bad value and its fix, before any work, and writes nothing.

Each row is one case: the command line (with placeholders for the experiment's files), the
files to prepare first, the value the message must name, and the fix it must end with.
"""

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers.toy import toy_experiment

from sepen.__main__ import main as sepen
from sepen.delta import save_delta


@dataclass(frozen=True)
class Case:
    argv: str  # placeholders: {cfg} {plan} {d} (the experiment's folder) {out} {foreign} {notjson}
    named: str  # the value the one line names
    fix: str  # the fix the line ends with
    prepare: Callable[[dict], None] | None = None  # writes the case's bad files first
    output: str = "{out}"  # what must not exist afterwards


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def empty_prompt_set(ctx: dict) -> None:
    vocabulary = {"vocabulary": {"animals": ["cat", "dog"]}, "prompts": {"animals": []}}
    _write(ctx["dir"] / "bad" / "ae.yaml", yaml.safe_dump(vocabulary))
    concepts = {"source": "attend_excite", "concepts": ["cat", "dog"], "splits": {"seen": []}}
    _write(ctx["dir"] / "bad" / "c.json", json.dumps(concepts))


def corrupt_delta(ctx: dict) -> None:
    _write(ctx["dir"] / "models" / "joint.safetensors", os.urandom(256))


def pickled_delta(ctx: dict) -> None:
    (ctx["dir"] / "models").mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.ones(2)}, ctx["dir"] / "models" / "joint.safetensors")


def foreign_delta(ctx: dict) -> None:
    save_delta(
        ctx["dir"] / "models" / "joint.safetensors",
        {"w": torch.ones(2)},
        base_model="CompVis/stable-diffusion-v1-4",
        revision=None,
        trainable="to_k",
        config={},
    )


def manifest_of(image: bytes | None) -> Callable[[dict], None]:
    """A manifest naming one image: missing (None) or with these bytes."""

    def prepare(ctx: dict) -> None:
        path = ctx["dir"] / "imgs" / "x" / "seed-00000.png"
        if image is not None:
            _write(path, image)
        entry = {"prompt_id": ctx["plan"]["order"][0], "seed": 0, "path": str(path)}
        manifest = {"method": "base", "shard": 0, "shards": 1, "images": [entry]}
        _write(ctx["dir"] / "bad" / "m.json", json.dumps(manifest))

    return prepare


def metrics_without_taxonomy(ctx: dict) -> None:
    result = {"methods": ["base"], "metrics": ["clip_full"], "sets": {}}
    _write(ctx["dir"] / "bad" / "agg.json", json.dumps(result))


SAMPLE = "sample --config {cfg} --method base --images-dir {d}/imgs --out {out}"
SAMPLE_SEPEN = (
    "sample --config {cfg} --plan {plan} --method sepen --images-dir {d}/imgs "
    "--deltas-dir {d}/models --out {out}"
)
FINETUNE = "finetune --config {cfg} --out {d}/out/d.safetensors --cpu"
METRICS = "metrics --config {cfg} --plan {plan} --out {out}"
AGGREGATE = "aggregate --config {cfg} --plan {plan} --out {out}"
TABLE = "report table --out {out}"
EMPTY_SET = (
    "prompts --config {cfg} --set evaluation.prompts=attend_excite "
    "--set evaluation.prompt_file={d}/bad/ae.yaml --set evaluation.sets=[] "
    "--concepts {d}/bad/c.json --out {out}"
)
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(64)

CASES = {
    "prompts: missing concepts file": Case(
        "prompts --config {cfg} --concepts {d}/none.json --out {out}",
        "none.json",
        "run `sepen concepts` first",
    ),
    "prompts: concepts file of another kind": Case(
        "prompts --config {cfg} --concepts {foreign} --out {out}",
        "foreign.json",
        "give the file `sepen concepts` writes",
    ),
    "prompts: an empty prompt set": Case(
        EMPTY_SET, "'animals'", "give it prompts or leave it out of the file", empty_prompt_set
    ),
    "finetune: missing plan": Case(
        FINETUNE + " --plan {d}/none.json --model-id joint",
        "none.json",
        "run `sepen prompts` first",
        output="{d}/out",
    ),
    "finetune: plan of another kind": Case(
        FINETUNE + " --plan {foreign} --model-id joint",
        "foreign.json",
        "give the file `sepen prompts` writes",
        output="{d}/out",
    ),
    "finetune: unknown model id": Case(
        FINETUNE + " --plan {plan} --model-id nope",
        "'nope'",
        "give one of its models ['joint']",
        output="{d}/out",
    ),
    "sample: missing plan": Case(
        SAMPLE + " --plan {d}/none.json", "none.json", "run `sepen prompts` first"
    ),
    "sample: plan that is not JSON": Case(
        SAMPLE + " --plan {notjson}", "notjson.json", "write it again with `sepen prompts`"
    ),
    "sample: missing delta": Case(
        SAMPLE_SEPEN, "joint.safetensors", "run `sepen finetune` for them"
    ),
    "sample: corrupt delta": Case(
        SAMPLE_SEPEN, "joint.safetensors", "write it again with `sepen finetune`", corrupt_delta
    ),
    "sample: pickled delta": Case(
        SAMPLE_SEPEN, "joint.safetensors", "write it again with `sepen finetune`", pickled_delta
    ),
    "sample: delta of another base model": Case(
        SAMPLE_SEPEN,
        "joint.safetensors",
        "sample it with --model CompVis/stable-diffusion-v1-4",
        foreign_delta,
    ),
    "metrics: missing manifest": Case(
        METRICS + " --manifest {d}/none.json", "none.json", "run `sepen sample` first"
    ),
    "metrics: manifest of another kind": Case(
        METRICS + " --manifest {foreign}", "foreign.json", "give the file `sepen sample` writes"
    ),
    "metrics: missing image": Case(
        METRICS + " --manifest {d}/bad/m.json",
        "seed-00000.png",
        "re-run `sepen sample` for this shard",
        manifest_of(None),
    ),
    "metrics: corrupt PNG": Case(
        METRICS + " --manifest {d}/bad/m.json",
        "seed-00000.png",
        "re-run `sepen sample` for its shard, which generates unreadable images again",
        manifest_of(CORRUPT_PNG),
    ),
    "aggregate: missing metrics file": Case(
        AGGREGATE + " --metrics {d}/none.json", "none.json", "run `sepen metrics` first"
    ),
    "aggregate: metrics file that is not JSON": Case(
        AGGREGATE + " --metrics {notjson}", "notjson.json", "write it again with `sepen metrics`"
    ),
    "fid: missing reference folder": Case(
        "fid --config {cfg} --set evaluation.fid.reference={d}/real --manifests {foreign} "
        "--out {out}",
        "real",
        "set evaluation.fid.reference to a folder of real images",
    ),
    "report: missing metrics file": Case(
        TABLE + " --metrics {d}/none.json", "none.json", "run `sepen aggregate` first"
    ),
    "report: metrics file of another kind": Case(
        TABLE + " --metrics {foreign}", "foreign.json", "give the file `sepen aggregate` writes"
    ),
    "report: taxonomy without the toy detector's metrics": Case(
        "report taxonomy --metrics {d}/bad/agg.json --out {out}",
        "toy_detection",
        "use toy_detection",
        metrics_without_taxonomy,
    ),
    "premise: missing plan": Case(
        "toy premise --config {cfg} --plan {d}/none.json --out {out}",
        "none.json",
        "run `sepen prompts` first",
    ),
    "premise: missing deltas": Case(
        "toy premise --config {cfg} --plan {plan} --deltas-dir {d}/nomodels --out {out}",
        "joint.safetensors",
        "run `sepen finetune` for them",
    ),
    "export-lora: no delta": Case(
        "export-lora --out {out}",
        "no delta given",
        "use --delta FILE (a delta of `sepen finetune`)",
    ),
    "toy study: no cells": Case(
        "toy study --config {cfg} --out-dir {d}/out",
        "no cells given",
        "use --cells FILE (a YAML list of {name, set})",
        output="{d}/out",
    ),
}


@pytest.fixture()
def experiment(tmp_path, tiny_toy_model):
    ctx = toy_experiment(tmp_path, tiny_toy_model, batch_size=4, bootstrap=50)
    ctx["foreign"] = _write(tmp_path / "bad" / "foreign.json", json.dumps({"hello": 1}))
    ctx["notjson"] = _write(tmp_path / "bad" / "notjson.json", "{not json")
    return ctx


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(
    experiment, capsys, case, fresh_accelerator_state
):
    row, d = CASES[case], experiment["dir"]
    if row.prepare is not None:
        row.prepare(experiment)
    values = {
        "cfg": experiment["config"],
        "plan": experiment["plan_path"],
        "d": d,
        "out": d / "out" / "result.json",
        "foreign": experiment["foreign"],
        "notjson": experiment["notjson"],
    }
    argv = shlex.split(row.argv.format(**values))
    assert sepen(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert row.named in errors[0], errors[0]
    assert errors[0].endswith(row.fix) or f"{row.fix} (" in errors[0], errors[0]
    assert not Path(row.output.format(**values)).exists()
