"""What the shipped SLURM profile asks for, per rule: the sbatch line that the executor plugin's
own code builds from profiles/slurm, read from a stand-in `sbatch` that records its arguments
and refuses the job (no cluster, no GPU needed). The worlds: a GPU world (a tiny Stable
Diffusion saved to disk, one custom prompt) and the toy world (CPU finetuning)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.project import SMOKE, copy_project, run

FAKE_SLURM = {
    # records the submission and refuses it: the plugin reports the job failed
    "sbatch": 'printf \'%s\\n\' "$*" >> "$SEPEN_SBATCH_LOG"\necho "sbatch: refused" >&2\nexit 1',
    "sacctmgr": "echo sepen",  # the profile's account exists
    **{tool: "exit 0" for tool in ("sinfo", "squeue", "sacct", "scontrol")},
}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """A project copy with a GPU world (two experiments: one node, two nodes of 4 GPUs) whose
    prompts are made locally, and a folder of stand-in SLURM tools."""
    project = copy_project(tmp_path_factory.mktemp("requests"))
    run(["python", "-m", "sepen", "tiny-model", "--out", "models/tiny"], project)
    (project / "prompts.yaml").write_text("vocabulary: [cat, dog]\nprompts: [a cat and a dog]\n")
    gpu = {
        "model": {"pretrained": "models/tiny"},
        "evaluation": {"prompts": "custom", "prompt_file": "prompts.yaml", "metrics": []},
        "finetune": {"image_size": 128, "resolutions": [8]},
    }
    nodes = {**gpu, "finetune": {**gpu["finetune"], "nodes": 2, "processes": 4}}
    for name, config in (("gpuworld", gpu), ("gpunodes", nodes)):
        (project / f"{name}.yaml").write_text(yaml.safe_dump({"experiment": name, **config}))
        target = f"results/{name}/prompts.json"
        run(["snakemake", target, "--cores", "1", "--configfile", f"{name}.yaml"], project)
    bin_dir = project / "fake-slurm"
    bin_dir.mkdir()
    for tool, body in FAKE_SLURM.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    return project


def sbatch_request(project: Path, target: str, configfile: str) -> dict:
    """The sbatch options (before the wrapped command) the plugin submits for `target` through
    the shipped profile, as {option: value}."""
    log = project / "sbatch.log"
    log.unlink(missing_ok=True)
    path = f"{project / 'fake-slurm'}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "SEPEN_SBATCH_LOG": str(log)}
    cmd = ["snakemake", target, "--profile", "profiles/slurm", "--retries", "0"]
    cmd += ["--configfile", configfile]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and log.is_file(), (done.stdout + done.stderr)[-3000:]
    line = log.read_text().splitlines()[0].split(" --wrap=")[0]
    request, words = {}, shlex.split(line)
    for i, word in enumerate(words):
        if word.startswith("-"):
            key, eq, value = word.partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value = words[i + 1]
            request[key] = value
    return request


def test_a_gpu_worlds_finetune_job_asks_for_its_gpu_and_the_profiles_cpus_per_gpu(worlds):
    request = sbatch_request(worlds, "results/gpuworld/models/cat-dog.safetensors", "gpuworld.yaml")
    assert request["--gpus"] == "1" and request["--cpus-per-gpu"] == "8"
    assert "--cpus-per-task" not in request  # read before cpus_per_gpu by the plugin
    assert (request["--mem"], request["-t"], request["-p"], request["-A"]) == (
        "32000",
        "480",
        "gpu",
        "sepen",
    )
    assert "--nodes" not in request


def test_a_sampling_shard_asks_for_one_gpu_and_four_cpus_per_gpu(worlds):
    request = sbatch_request(worlds, "results/gpuworld/samples/base/shard-0.json", "gpuworld.yaml")
    assert (request["--gpus"], request["--cpus-per-gpu"], request["--mem"]) == ("1", "4", "24000")
    assert "--cpus-per-task" not in request


def test_a_finetune_job_across_nodes_asks_per_node_for_gpus_and_tasks(worlds):
    request = sbatch_request(worlds, "results/gpunodes/models/cat-dog.safetensors", "gpunodes.yaml")
    assert request["--nodes"] == "2" and request["--ntasks-per-node"] == "4"
    assert request["--gres"] == "gpu:4" and request["--cpus-per-gpu"] == "8"
    assert not {"--gpus", "--ntasks-per-gpu", "--cpus-per-task", "--ntasks"} & set(request)


def test_a_cpu_rule_asks_for_its_threads(worlds):
    """A CPU rule asks for its threads and memory; the toy world's finetuning runs on CPUs: its
    job asks for the rule's 2 threads, with the profile's finetuning memory and time."""
    request = sbatch_request(worlds, "results/smoke/concepts.json", SMOKE)
    assert request["--cpus-per-task"] == "1" and request["--ntasks"] == "1"
    assert request["--mem"] == "1000" and "--gpus" not in request  # the rule's own
    run(["snakemake", "results/smoke/prompts.json", "--cores", "1", "--configfile", SMOKE], worlds)
    request = sbatch_request(worlds, "results/smoke/models/joint.safetensors", SMOKE)
    assert request["--cpus-per-task"] == "2" and "--gpus" not in request
    assert request["--mem"] == "32000" and request["-t"] == "480"  # the profile's finetune
