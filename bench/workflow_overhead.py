"""Workflow overhead: Snakemake's no-op run on a finished workflow and its DAG construction.

Times, as medians of `--repeats` runs in turns:
- start-up: `snakemake --version` (the interpreter and Snakemake's import; the floor of any call);
- no-op: `snakemake --cores all` in a finished project (checked first with a dry run, so that
  an unfinished project is refused before any of its jobs runs);
- DAG: `snakemake -n --cores all --configfile config/sd14_joint.yaml`, a dry run that builds the
  whole DAG of the large-scale joint config (its job count is printed beside it).

    snakemake --cores all && python bench/workflow_overhead.py      # the default run, finished
    python bench/workflow_overhead.py --directory /tmp/p --configfile config/test/smoke.yaml
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-2000:]}")
    return seconds, out


def jobs_in(output: str) -> int:
    found = re.search(r"^total\s+(\d+)\s*$", output, re.M)
    if not found:
        raise SystemExit(f"no job count in the dry run's output:\n{output[-2000:]}")
    return int(found.group(1))


def measure(directory: Path, configfile: str | None, dag_config: str, repeats: int) -> dict:
    extra = ["--configfile", configfile] if configfile else []
    commands = {
        "startup": ["snakemake", "--version"],
        "noop": ["snakemake", "--cores", "all", *extra],
        "dag": ["snakemake", "-n", "--cores", "all", "--configfile", dag_config],
    }
    # a dry run first: timing the "no-op" of an unfinished workflow would run its jobs
    _, planned = _timed(["snakemake", "-n", "--cores", "all", *extra], directory)
    if "Nothing to be done" not in planned:
        raise SystemExit(
            f"the workflow in {directory} is not finished (a dry run lists jobs to run): "
            f"run `snakemake --cores all {' '.join(extra)}` there first"
        )
    times: dict[str, list[float]] = {k: [] for k in commands}
    outputs: dict[str, str] = {}
    for _ in range(repeats):
        for key, cmd in commands.items():
            seconds, outputs[key] = _timed(cmd, directory)
            times[key].append(seconds)
    if "Nothing to be done" not in outputs["noop"]:
        raise SystemExit(f"the no-op run in {directory} did work:\n{outputs['noop'][-2000:]}")
    r = {k: statistics.median(v) for k, v in times.items()}
    return {
        "directory": str(directory),
        "configfile": configfile,
        "dag_config": dag_config,
        "repeats": repeats,
        "startup_s": r["startup"],
        "noop_s": r["noop"],
        "dag_s": r["dag"],
        "dag_jobs": jobs_in(outputs["dag"]),
        "noop_vs_startup": r["noop"] / r["startup"],
        "dag_vs_startup": r["dag"] / r["startup"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--directory", type=Path, default=ROOT, help="a project with a finished run")
    p.add_argument("--configfile", help="the finished run's config (default: config/config.yaml)")
    p.add_argument("--dag-config", default="config/sd14_joint.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    r = measure(args.directory, args.configfile, args.dag_config, args.repeats)
    print(f"workflow overhead in {r['directory']}, median of {r['repeats']}")
    print(f"{'call':<48}{'seconds':>9}{'x start-up':>12}")
    print(f"{'snakemake --version (start-up)':<48}{r['startup_s']:>9.2f}{1.0:>12.2f}")
    print(f"{'no-op snakemake --cores all':<48}{r['noop_s']:>9.2f}{r['noop_vs_startup']:>12.2f}")
    dag = f"dry run, {Path(r['dag_config']).name} ({r['dag_jobs']} jobs)"
    print(f"{dag:<48}{r['dag_s']:>9.2f}{r['dag_vs_startup']:>12.2f}")
    if args.json:
        from sepen.atomic import write_json

        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
