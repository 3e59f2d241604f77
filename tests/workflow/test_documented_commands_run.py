"""Every `snakemake` command that README.md and docs/ document dry-runs in a copy of the
project (a run becomes `-n`; `--report FILE`, which needs a finished run, becomes a dry run of
the same config; commands that differ only in `--cores` dry-run once). Conda's command needs
conda: where it is missing, that test says so and skips."""

import shlex
import shutil
from pathlib import Path

import pytest
from helpers.project import ROOT, copy_project, run

from sepen.docs_commands import documented_commands

SKIP = {"docs/release-notes.md"}


def snakemake_commands() -> list[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    seen: dict[str, str] = {}
    for page in pages:
        if str(page.relative_to(ROOT)) in SKIP or "reference" in page.parts:
            continue
        for d in documented_commands(page, ROOT):
            if d.text.startswith("snakemake"):
                seen.setdefault(d.text, str(d))
    return sorted(seen)


def _drop(args: list[str], flag: str) -> list[str]:
    if flag not in args:
        return args
    k = args.index(flag)
    drop = 2 if k + 1 < len(args) and not args[k + 1].startswith("-") else 1
    return args[:k] + args[k + drop :]


def dry_run_args(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    if "--version" in args or "--unlock" in args:
        return args
    args = _drop(_drop([a for a in args if a != "-n"], "--report"), "--cores")
    return ["-n", "--cores", "2", *args]


def dry_runs() -> list[str]:
    return sorted({shlex.join(dry_run_args(c)) for c in snakemake_commands()})


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("docs-commands"))


def test_the_docs_document_snakemake_commands():
    commands = snakemake_commands()
    assert "snakemake --cores all" in commands and len(commands) >= 10
    assert dry_run_args("snakemake --report results/report.html --configfile c.yaml") == [
        *("-n", "--cores", "2", "--configfile", "c.yaml")
    ]
    assert dry_run_args("snakemake -n --cores all") == ["-n", "--cores", "2"]


@pytest.mark.parametrize("args", dry_runs())
def test_every_documented_snakemake_command_dry_runs(project, args):
    if "conda" in args and shutil.which("conda") is None:
        pytest.skip("conda is not installed here: the conda command cannot dry-run")
    out = run(["snakemake", *shlex.split(args)], project, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
