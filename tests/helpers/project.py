"""Temporary copies of the project and the Snakemake/DVC command lines the workflow tests
run in them."""

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "config/test/smoke.yaml"  # the smoke config, relative to a project copy

SMOKE_THREADED_RULES = ("sample", "finetune", "report_attention", "toy_premise")

PROJECT_FILES = ["Snakefile", "workflow", "config", "profiles", "dvc.yaml", "data", "sepen"]


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


# The smoke jobs are bound by their imports (torch, diffusers: one core each) and draw in a
# second or two, so one thread per job lets two run side by side on 2 cores (a smoke run 69 s
# instead of 100 s). Every test run uses it: a thread count changes CPU arithmetic, and runs
# are compared bit for bit.
ONE_THREAD = ["--set-threads", *(f"{rule}=1" for rule in SMOKE_THREADED_RULES)]


def snakemake_cmd(*args: str) -> list[str]:
    """A local Snakemake command line as every test run uses it (2 cores, ONE_THREAD)."""
    return ["snakemake", "--cores", "2", *args, *ONE_THREAD]


def snakemake(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(snakemake_cmd(*args), cwd, check)


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def shell_commands(output: str) -> set[str]:
    cmds = set()
    for line in output.splitlines():
        if line.startswith("Shell command: python -m sepen"):
            cmd = line.removeprefix("Shell command: ")
            cmds.add(re.sub(r" 2> logs/\S+$", "", cmd).strip())
    return cmds
