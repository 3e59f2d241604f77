"""Style checks as tests, so the README's test command runs them: ruff (lint and format),
snakefmt, and the documentation site's strict build."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def test_ruff_check_passes():
    done = run(sys.executable, "-m", "ruff", "check", ".")
    assert done.returncode == 0, done.stdout[-3000:]


def test_ruff_format_check_passes():
    done = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert done.returncode == 0, done.stdout[-3000:]


def test_snakefmt_check_passes():
    done = run("snakefmt", "--check", "Snakefile", "workflow/rules")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_mkdocs_build_strict_passes(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = run("mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()
    assert (tmp_path / "site" / "method" / "index.html").is_file()
