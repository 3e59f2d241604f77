"""The Snakemake workflow and the DVC pipeline, run in temporary copies of the project."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.project import (
    ONE_THREAD,
    ROOT,
    SMOKE,
    copy_project,
    job_counts,
    run,
    shell_commands,
    snakemake,
    snakemake_cmd,
)

from sepen.config import load_config
from sepen.toy.detect import FAILURES
from sepen.workflow import STEP_PARAMS


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("project"))


def test_lint_and_snakefmt_pass(project):
    assert snakemake(project, "--lint", check=False).returncode == 0
    assert run(["snakefmt", "--check", "Snakefile", "workflow/rules"], project).returncode == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ("finetune: {stepz: 3}", r"config key finetune: .*'stepz' was unexpected"),
        ("finetune: {steps: -3}", r"config key finetune.steps = -3 is invalid"),
        ("evaluation: {methods: [base, magic]}", r"evaluation.methods.1 = 'magic' is invalid"),
        ("sampling: {steps: many}", r"sampling.steps = 'many' is invalid"),
    ],
)
def test_a_wrong_config_key_type_or_value_is_named_before_any_job_runs(project, bad, message):
    cfg = project / "bad.yaml"
    cfg.write_text(f"experiment: bad\n{bad}\n")
    proc = snakemake(project, "--configfile", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr)
    assert not (project / "results" / "bad").exists()


@pytest.mark.parametrize(
    "config, finetunes, images",
    [("sd14_pairs", 276, 276 * 64), ("sd14_joint", 1, 200 * 64), ("sd21_pairs", 276, 276 * 64)],
)
def test_paper_configs_dry_run_without_weights_and_list_their_jobs(
    project, config, finetunes, images
):
    from sepen.config import load_config
    from sepen.plan import build_plan

    out = snakemake(project, "-n", "--configfile", f"config/{config}.yaml").stdout
    counts = job_counts(out)
    cfg = load_config(ROOT / "config" / f"{config}.yaml")
    shards = cfg["evaluation"]["shards"] * len(cfg["evaluation"]["methods"])
    assert counts["finetune"] == finetunes and counts["sample"] == shards
    assert counts["concepts"] == counts["prompts"] == counts["report_grid"] == 1
    assert counts["metrics"] == shards and counts["aggregate"] == counts["report_table"] == 1
    for method in ("base", "sepen", "attend_excite", "sepen_test_time"):
        assert f"--method {method}" in out
    assert "sepen finetune" in out
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        plan = build_plan(cfg)
    assert len(plan["order"]) * len(plan["seeds"]) == images


WORKFLOW_CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for p in [*(ROOT / "config").glob("*.yaml"), *(ROOT / "config/test").glob("*.yaml")]
    # settings-study grids (sepen toy study, sepen toy test-time), not workflow configs
    if not p.name.startswith(("toy_study", "toy_test_time"))
)


def test_every_shipped_config_is_a_workflow_config():
    assert "config/sdxl_pairs.yaml" in WORKFLOW_CONFIGS
    assert "config/sdxl_joint.yaml" in WORKFLOW_CONFIGS and "config/toy_v2.yaml" in WORKFLOW_CONFIGS
    for path in WORKFLOW_CONFIGS:
        assert "experiment" in yaml.safe_load((ROOT / path).read_text()), path


@pytest.mark.parametrize("config", WORKFLOW_CONFIGS)
def test_every_shipped_config_dry_runs_without_weights(project, config):
    """`snakemake -n` of each shipped config, SDXL included: the DAG builds from the config
    alone (no model weights, no GPU) and reaches the report."""
    out = snakemake(project, "-n", "--configfile", config).stdout
    counts = job_counts(out)
    assert counts["all"] == 1 and counts["report_grid"] == 1 and counts["sample"] >= 2
    cfg = load_config(ROOT / config)  # with the file it extends
    if cfg["evaluation"]["metrics"]:  # configs without metrics stop at the samples
        assert counts["aggregate"] == 1 and counts["metrics"] == counts["sample"]
        assert f"results/{cfg['experiment']}/metrics.json" in out


def test_dvc_stages_run_the_same_commands_and_params_as_the_snakemake_rules(project):
    from dvc.repo import Repo

    out = snakemake(project, "-n", "-p", "--forceall", "--nolock").stdout
    snake = shell_commands(out)
    run(["dvc", "init", "--no-scm", "-q"], project) if not (project / ".dvc").exists() else None
    stages = Repo(str(project)).index.stages
    dvc = {" ".join(s.cmd.split()) for s in stages}
    assert snake == dvc
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    config = yaml.safe_load((project / "config/config.yaml").read_text())
    assert spec["vars"][1]["shards"] == list(range(config["evaluation"]["shards"]))
    from sepen.config import load_config
    from sepen.plan import build_plan

    plan = build_plan(load_config(project / "config/config.yaml"))
    assert spec["vars"][2]["models"] == sorted(plan["models"])
    for name, stage in spec["stages"].items():
        keys = stage.get("params", [{}])[0].get("config/config.yaml", [])
        assert sorted(keys) == sorted(STEP_PARAMS[name]), name
        for key in keys:  # DVC needs each key written in the file, defaults do not count
            node = config
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{key} missing in config.yaml"
                node = node[part]


@pytest.fixture(scope="module")
def smoke_run(project):
    """The smoke config run once through Snakemake (about 2 minutes on 2 cores)."""
    proc = snakemake(project, "--configfile", SMOKE)
    return project, proc


@pytest.mark.slow
def test_smoke_run_writes_every_artifact_with_real_numbers(smoke_run):
    project, _ = smoke_run
    r = project / "results" / "smoke"
    result = json.loads((r / "metrics.json").read_text())
    plan = json.loads((r / "prompts.json").read_text())
    assert set(result["sets"]) == {"single", "held_out_pairs", "overall"}
    for name, by_method in result["sets"].items():
        n = len(plan["order"] if name == "overall" else plan["sets"][name]) * 2
        # the test-time methods sample the multi-object prompts only (their set: held-out pairs)
        guided = ["attend_excite", "sepen_test_time"]
        methods = ["base", "sepen"] + (guided if name == "held_out_pairs" else [])
        assert sorted(by_method) == sorted(methods)
        for method in methods:
            ci = by_method[method]["success"]
            assert ci["n"] == n and 0 <= ci["lo"] <= ci["mean"] <= ci["hi"] <= 1
        taxonomy = {k for k in by_method["base"] if k.startswith("fail_")}
        assert taxonomy == {f"fail_{k}" for k in FAILURES} | {"fail_spurious"}
    premise = json.loads((r / "premise.json").read_text())
    assert set(premise["methods"]) == {"base", "sepen"}
    held = premise["methods"]["base"]["held_out_pairs"]
    assert held["images"] == len(plan["sets"]["held_out_pairs"]) * 2
    assert set(held["auc"]) == {"separate", "enhance", "total"}
    for png in ("samples", "losses", "attention", "taxonomy"):
        assert (r / "report" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    html = (r / "report" / "metrics.html").read_text()
    assert "held_out_pairs" in html and "Settings study" in html and "Premise check" in html
    assert "The paper's four rows" in html and "0.441" in html and "41.74" in html
    cost = result["sampling_cost"]  # from the manifests: every image of this fresh run drawn
    assert set(cost) == {"base", "sepen", "attend_excite", "sepen_test_time"}
    for method, c in cost.items():
        drawn = sum(
            json.loads((r / "samples" / method / f"shard-{k}.json").read_text())["drawn"]
            for k in (0, 1)
        )
        assert c["images"] == drawn > 0 and c["seconds"] > 0 and c["images_per_s"] > 0
    assert cost["base"]["x_base_time"] == 1.0 and "Sampling cost per method" in html
    for method in ("base", "sepen"):
        for shard in (0, 1):
            m = json.loads((r / "samples" / method / f"shard-{shard}.json").read_text())
            assert all(Path(project / im["path"]).is_file() for im in m["images"])
    assert (project / "logs/smoke/finetune/joint.log").read_text()
    assert (project / "benchmarks/smoke/finetune/joint.tsv").is_file()
    report = project / "report.html"
    snakemake(project, "--configfile", SMOKE, "--report", str(report))
    assert report.stat().st_size > 10_000


@pytest.mark.slow
def test_smoke_rerun_is_a_no_op_and_a_changed_key_reruns_only_what_reads_it(smoke_run):
    project, _ = smoke_run
    again = snakemake(project, "--configfile", SMOKE)
    assert "Nothing to be done" in again.stdout + again.stderr
    config = project / SMOKE
    text = config.read_text()
    assert "  steps: 6\n" in text
    config.write_text(text.replace("  steps: 6\n", "  steps: 7\n"))  # finetune.steps
    try:
        counts = job_counts(snakemake(project, "-n", "--configfile", str(config)).stdout)
    finally:
        config.write_text(text)
    assert counts["finetune"] == 1 and counts["sample"] == 2  # the two sepen shards
    assert "concepts" not in counts and "prompts" not in counts
    assert counts["metrics"] == 2 and counts["aggregate"] == 1


# Code edits and the steps they must re-run (their code imports the module), in both tools
REPORT_STEPS = {
    "report_table",
    "report_landing",
    "report_grid",
    "report_losses",
    "report_taxonomy",
    "report_attention",
}
CODE_EDITS = {
    # the losses: finetuning, the premise check and sampling (SepEn at test time, A&E's smoothing)
    "sepen/losses.py": {"finetune", "toy_premise", "sample"},
    "sepen/report/figures.py": REPORT_STEPS,
}


def edited(project: Path, module: str):
    """A context in which `module` of the project copy carries one more comment line."""
    import contextlib

    @contextlib.contextmanager
    def edit():
        path = project / module
        text = path.read_text()
        path.write_text(text + "\n# an edit that changes no behaviour\n")
        try:
            yield
        finally:
            path.write_text(text)

    return edit()


def summary(project: Path) -> tuple[set[str], set[str]]:
    """From `snakemake --summary`: the rules whose outputs were made with other params (the code
    hash is one), and the rules with an update pending."""
    out = snakemake(project, "--summary", "--configfile", SMOKE).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("results/")]
    changed = {r[2] for r in rows if r[4] == "params changed"}
    pending = {r[2] for r in rows if r[5] == "update pending"}
    return changed, pending


@pytest.mark.slow
def test_a_code_edit_reruns_the_steps_whose_code_imports_it_and_what_follows(smoke_run):
    project, _ = smoke_run
    with edited(project, "sepen/losses.py"):
        changed, pending = summary(project)
        counts = job_counts(snakemake(project, "-n", "--configfile", SMOKE).stdout)
    assert changed == CODE_EDITS["sepen/losses.py"]
    assert pending == changed | {"metrics", "aggregate"} | REPORT_STEPS
    assert counts["finetune"] == 1 and counts["toy_premise"] == 1
    # every sampling shard (4 methods x 2 shards; the kept images are reused), then their metrics
    assert counts["sample"] == 8 and counts["metrics"] == 8
    assert counts["aggregate"] == 1 and counts["report_table"] == 1
    assert "concepts" not in counts and "prompts" not in counts  # nothing upstream
    with edited(project, "sepen/report/figures.py"):
        changed, pending = summary(project)
        counts = job_counts(snakemake(project, "-n", "--configfile", SMOKE).stdout)
    assert changed == pending == CODE_EDITS["sepen/report/figures.py"]
    assert set(counts) - {"all"} == REPORT_STEPS
    assert summary(project) == (set(), set())  # the edits undone
    again = snakemake(project, "-n", "--configfile", SMOKE)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_workflow_overhead_bench_times_the_no_op_and_the_joint_dag(smoke_run, tmp_path):
    project, _ = smoke_run
    out = tmp_path / "overhead.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "workflow_overhead.py"),
        "--directory",
        str(project),
    ]
    opts = ["--configfile", SMOKE, "--repeats", "1", "--json", str(out)]
    proc = run([*cmd, *opts], project)
    r = json.loads(out.read_text())
    # sd14_joint: 1 finetune, 4 methods x 8 shards to sample and score, the report's landing text
    assert r["dag_jobs"] == 74
    assert 0 < r["startup_s"] and r["noop_vs_startup"] == r["noop_s"] / r["startup_s"]
    assert f"{r['dag_s']:.2f}" in proc.stdout and "sd14_joint.yaml" in proc.stdout
    # a project whose run is not finished is refused before any of its jobs runs
    config = project / SMOKE
    text = config.read_text()
    delta = project / "results/smoke/models/joint.safetensors"
    before = (delta.read_bytes(), delta.stat().st_mtime_ns)
    config.write_text(text.replace("  steps: 6\n", "  steps: 7\n"))
    try:
        refused = run([*cmd, *opts], project, check=False)
    finally:
        config.write_text(text)
    assert refused.returncode != 0 and "is not finished" in refused.stderr
    assert (delta.read_bytes(), delta.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_smoke_config_through_dvc_matches_snakemake_and_pushes_and_pulls(
    smoke_run, tmp_path_factory
):
    from safetensors.torch import load_file

    snake_project, _ = smoke_run
    project = copy_project(tmp_path_factory.mktemp("dvc"))
    from sepen.config import load_config

    # dvc.yaml reads config/config.yaml, with every key its stages use written out
    smoke = load_config(ROOT / SMOKE, ["evaluation.shards=1"])
    (project / "config/config.yaml").write_text(yaml.safe_dump(smoke))
    # dvc.yaml generated for it, as for the default config (its models var: the plan's models)
    run([sys.executable, "-m", "sepen", "workflow", "dvc-yaml"], project)
    assert "models:\n  - joint\n" in (project / "dvc.yaml").read_text()
    run(["dvc", "init", "--no-scm", "-q"], project)
    run(["dvc", "remote", "add", "-d", "local", str(project / "remote")], project)
    run(["dvc", "repro"], project)
    r, s = project / "results/smoke", snake_project / "results/smoke"
    ours, theirs = (
        load_file(r / "models/joint.safetensors"),
        load_file(s / "models/joint.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert all((ours[k] - theirs[k]).abs().max() < 1e-6 for k in ours)
    assert json.loads((r / "prompts.json").read_text()) == json.loads(
        (s / "prompts.json").read_text()
    )
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    summary = json.loads((r / "metrics_summary.json").read_text())
    found = next(iter(shown.values()))["data"]["results/smoke/metrics_summary.json"]["data"]
    assert found == summary
    status = run(["dvc", "status"], project).stdout
    assert "up to date" in status
    run(["dvc", "push"], project)
    delta = r / "models/joint.safetensors"
    before = delta.read_bytes()
    delta.unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    run(["dvc", "pull"], project)
    assert delta.read_bytes() == before

    # a key-level change: the stages that list the key run again, and then only what reads
    # their changed outputs; nothing upstream
    def change(section: str, key: str, value) -> tuple[set[str], list[str]]:
        config = yaml.safe_load((project / "config/config.yaml").read_text())
        config[section][key] = value
        (project / "config/config.yaml").write_text(yaml.safe_dump(config))
        changed = set(json.loads(run(["dvc", "status", "--json"], project).stdout))
        ran = re.findall(r"Running stage '([^']+)'", run(["dvc", "repro"], project).stdout)
        return changed, ran

    changed, ran = change("report", "grid_seeds", 1)
    assert changed == {"report_grid"} and ran == ["report_grid"]
    changed, ran = change("evaluation", "bootstrap", 100)
    assert changed == {"aggregate", "toy_premise"}
    assert changed <= set(ran) <= changed | {"report_table", "report_landing", "report_taxonomy"}

    # a code edit: the stages whose code imports the module, as Snakemake re-runs them
    for module, steps in CODE_EDITS.items():
        with edited(project, module):
            status = json.loads(run(["dvc", "status", "--json"], project).stdout)
        assert {name.split("@")[0] for name in status} == steps, module
    assert "up to date" in run(["dvc", "status"], project).stdout


def test_toy_pretraining_and_study_join_the_dag_behind_their_switches(project):
    smoke = load_config(ROOT / SMOKE)  # layered: written out whole
    smoke["toy"]["pretrain"] = {"run": True}
    smoke["toy"]["study"] = {"run": True}
    smoke["toy"]["card"] = {"run": True}
    (project / "switched.yaml").write_text(yaml.safe_dump(smoke))
    out = snakemake(project, "-n", "-p", "--forceall", "--configfile", "switched.yaml").stdout
    counts = job_counts(out)
    assert counts["toy_pretrain"] == 1 and counts["toy_study"] == 1 and counts["toy_card"] == 1
    commands = shell_commands(out)
    finetune = next(c for c in commands if " finetune " in c)
    assert " --model results/smoke/toy_base " in finetune
    assert "--study results/smoke/study/study.json" in out
    card = next(c for c in commands if " toy card " in c)
    assert "--model results/smoke/toy_base --out results/smoke/world_card.json" in card
    pretrain = next(c for c in commands if " toy pretrain " in c)
    assert pretrain.endswith("--out results/smoke/toy_base --resume latest")
    for rule in ("report table", "report landing"):  # the card is shown in the report
        cmd = next(c for c in commands if f" {rule} " in c)
        assert "--card results/smoke/world_card.json" in cmd
    default = snakemake(project, "-nFp", "--configfile", SMOKE).stdout
    assert "toy_pretrain" not in job_counts(default) and "data/toy_study/study.json" in default
    assert "toy_card" not in job_counts(default)
    assert "--card data/toy_base/world_card.json" in default  # the shipped model's card


def test_nested_config_values_on_the_command_line_are_read_as_the_schema_types(project):
    # Snakemake hands `--config key={...}` over with every nested scalar a string
    out = snakemake(project, "-n", "-p", "--forceall", "--config", "toy={pretrain: {run: true}}")
    assert job_counts(out.stdout)["toy_pretrain"] == 1
    snakemake(project, "-n", "--forceall", "--config", "evaluation={images_per_prompt: 8}")
    merged = yaml.safe_load((project / "results/toy/config.merged.yaml").read_text())
    assert merged["evaluation"]["images_per_prompt"] == 8
    bad = snakemake(project, "-n", "--config", "evaluation={images_per_prompt: many}", check=False)
    assert bad.returncode != 0 and "images_per_prompt = 'many'" in bad.stdout + bad.stderr


def test_fid_jobs_join_the_dag_when_a_reference_folder_is_set(project):
    cfg = load_config(ROOT / "config/sd14_pairs.yaml")  # layered: written out whole
    cfg["evaluation"]["fid"] = {"reference": "data/coco_val"}
    (project / "fid.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(project, "-n", "-p", "--configfile", "fid.yaml").stdout
    assert job_counts(out)["fid"] == len(cfg["evaluation"]["methods"]) == 4  # one per method
    aggregate = next(c for c in shell_commands(out) if " aggregate " in c)
    assert "--fid results/sd14_pairs/fid/base.json" in aggregate


def _remove_what_reads_samples(project: Path) -> None:
    """Delete a finished smoke run's metrics and report: Snakemake re-makes a missing
    intermediate file (a sampling manifest) only when something that reads it is missing."""
    r = project / "results/smoke"
    for later in ("metrics", "report", "plots", "metrics.json", "metrics_summary.json"):
        shutil.rmtree(r / later) if (r / later).is_dir() else (r / later).unlink()


@pytest.mark.slow
def test_an_interrupted_sampling_shard_rerun_generates_only_the_missing_images(smoke_run):
    project, _ = smoke_run
    shard = project / "results/smoke/samples/base/shard-0.json"
    images = json.loads(shard.read_text())["images"]
    # the state an interruption of the first sampling job leaves: some of its images written,
    # its manifest and everything downstream not yet
    shard.unlink()
    _remove_what_reads_samples(project)
    for im in images[1:3]:
        (project / im["path"]).unlink()
    kept = (project / images[0]["path"]).read_bytes()
    snakemake(project, "--configfile", SMOKE)
    manifest = json.loads(shard.read_text())
    assert (manifest["generated"], manifest["reused"]) == (2, len(images) - 2)
    assert (project / images[0]["path"]).read_bytes() == kept


def _processes_in(project: Path):
    """(pid, command line as a list of bytes) of every process working in `project`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd == str(project):
            yield int(proc.name), cmd


def _job_pids(project: Path, step: str) -> list[int]:
    """Processes of `python -m sepen <step>` running in `project` (read from /proc)."""
    return [pid for pid, cmd in _processes_in(project) if b"sepen" in cmd and step.encode() in cmd]


def _kill_job_when(project: Path, run, step: str, ready, timeout: float = 600) -> None:
    """SIGKILL the `sepen <step>` job once `ready()` holds, as a preempted cluster job dies;
    then let the workflow run end (it reports the failed job)."""
    import signal
    import time

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if run.poll() is not None:
            raise AssertionError(f"the run ended before the {step} job could be killed")
        pids = _job_pids(project, step)
        if pids and ready():
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no {step} job reached the kill point in {timeout} s")
    assert run.wait(timeout=300) != 0  # the killed job fails the run


def _digests(project: Path) -> dict[str, str]:
    """sha256 of the delta, every image and every metrics file of a smoke run."""
    import hashlib

    r = project / "results/smoke"
    files = [r / "models/joint.safetensors", *sorted((r / "samples").rglob("*.png"))]
    files += sorted((r / "metrics").rglob("*.json"))
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _start(project: Path, env: dict | None = None, *targets: str) -> subprocess.Popen:
    return subprocess.Popen(
        snakemake_cmd(*targets, "--configfile", SMOKE),
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def _shim_env(**variables: str) -> dict:
    """Variables that make a subprocess load tests/shims/sitecustomize.py with `variables`."""
    return {"PYTHONPATH": str(ROOT / "tests/shims"), **variables}


def _kill_once_env(marker: Path, images: int, where: str = "") -> dict:
    """The first sampling job (of those whose images' paths hold `where`) to put its
    `images`-th image in place dies by SIGKILL (the shim in tests/shims), leaving `marker`
    with its command line."""
    return _shim_env(
        SEPEN_TEST_KILL_AFTER_IMAGES=str(images),
        SEPEN_TEST_KILL_MARKER=str(marker),
        SEPEN_TEST_KILL_WHERE=where,
    )


def _killed_shard(project: Path, marker: Path) -> tuple[Path, Path]:
    """The manifest and image folder of the sampling job the shim killed."""
    argv = json.loads(marker.read_text())["argv"]
    value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    return project / value["--out"], project / value["--images-dir"]


@pytest.mark.slow
def test_killed_jobs_rerun_to_the_same_delta_images_and_metrics(smoke_run, tmp_path_factory):
    """SIGKILL the finetuning job while checkpoint-4 is saved (checkpoint-2 complete; that run
    makes only the delta, so that no sampling job has run yet), then a base sampling job right
    after its 6th image (batches of 4: one whole batch and half the next), then the metrics
    job; each time the same command goes on. The finetuning resumes from checkpoint-2, never
    from the save cut short; the killed shard keeps its 6 images, writes the rest and draws
    again only the half-finished batch; and the delta, images and metrics equal an
    uninterrupted run's bit for bit."""
    reference, _ = smoke_run
    project = copy_project(tmp_path_factory.mktemp("killed"))
    r = project / "results/smoke"
    state = r / "state/joint"
    delta = "results/smoke/models/joint.safetensors"
    run = _start(project, _shim_env(SEPEN_TEST_SLOW_SAVE="3"), delta)
    _kill_job_when(project, run, "finetune", lambda: any(state.glob(".checkpoint-4.tmp/*")))
    # the save cut short is not a checkpoint; the one before it is whole
    assert [p.name for p in state.glob("checkpoint-*")] == ["checkpoint-2"]
    marker = project / "killed-sample.json"
    run = _start(project, _kill_once_env(marker, 6, "/samples/base/"))
    assert run.wait(timeout=600) != 0  # the killed sampling job fails the run
    manifest, images = _killed_shard(project, marker)
    assert not manifest.exists() and len(list(images.rglob("seed-*.png"))) == 6
    kept = {p: p.read_bytes() for p in images.rglob("seed-*.png")}
    run = _start(project)
    _kill_job_when(project, run, "metrics", lambda: True)
    snakemake(project, "--configfile", SMOKE)
    assert not list(state.glob(".checkpoint-*"))
    log = (project / "logs/smoke/finetune/joint.log").read_text()
    assert "resuming from" in log and "checkpoint-2 (step 2)" in log
    shard = json.loads(manifest.read_text())
    n = len(shard["images"])
    assert (shard["generated"], shard["reused"], shard["drawn"]) == (n - 6, 6, n - 4)
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert _digests(project) == _digests(reference)


def _kill_everything_in(project: Path) -> None:
    """SIGKILL every process whose working folder is `project` (Snakemake and its jobs)."""
    import signal

    for pid, _ in _processes_in(project):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_killed_snakemake_is_unlocked_and_a_job_that_fails_once_resumes_under_retries(
    smoke_run, tmp_path_factory
):
    """Two rows of "What survives what": Snakemake itself killed (with its jobs) leaves its
    lock, `snakemake --unlock` once, then the same command; in that run one sampling job dies
    after its 3rd image (injected) and `--retries 1` resumes it. Every image finished before
    either kill is kept, and the results equal an uninterrupted run's."""
    import time

    reference, _ = smoke_run
    # the finished run without its images: the run below samples, scores and reports again
    project = tmp_path_factory.mktemp("unlock")
    shutil.copytree(reference, project, symlinks=True, dirs_exist_ok=True)
    samples = project / "results/smoke/samples"
    shutil.rmtree(samples)
    _remove_what_reads_samples(project)
    run = _start(project)
    start = time.monotonic()
    while not any(samples.rglob("seed-*.png")):
        assert run.poll() is None, "the run ended before any image was drawn"
        assert time.monotonic() - start < 600, "no image in 600 s"
        time.sleep(0.05)
    _kill_everything_in(project)
    assert run.wait(timeout=60) != 0
    kept = {p: p.read_bytes() for p in samples.rglob("seed-*.png")}
    locked = snakemake(project, "--configfile", SMOKE, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(project, "--unlock", "--configfile", SMOKE)
    marker = project / "killed-sample.json"
    done = subprocess.run(
        snakemake_cmd("--retries", "1", "--configfile", SMOKE),
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, **_kill_once_env(marker, 3)},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    manifest, _ = _killed_shard(project, marker)  # a job did die, and its retry finished
    assert json.loads(manifest.read_text())["reused"] >= 3
    shards = [json.loads(m.read_text()) for m in samples.glob("*/shard-*.json")]
    assert sum(m["reused"] for m in shards) == len(kept) + 3
    drawn = len(list((reference / "results/smoke/samples").rglob("seed-*.png")))
    assert sum(m["generated"] + m["reused"] for m in shards) == drawn
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert _digests(project) == _digests(reference)


def test_a_reader_never_sees_a_partial_file_while_two_processes_sample_one_shard(tmp_path):
    """Two `sepen sample` processes write the same shard while this process reads every image
    and manifest it can see. Each write is slowed (half the bytes, a pause, the rest), so a
    file written in place would be caught half-written; written to a hidden temporary file and
    renamed, every visible file is whole."""
    import time

    from PIL import Image

    from sepen.atomic import write_json
    from sepen.config import load_config
    from sepen.plan import build_plan

    config = ROOT / SMOKE
    plan = tmp_path / "prompts.json"
    prompts = build_plan(load_config(config))
    write_json(plan, prompts)
    images = tmp_path / "shard-0"
    argv = ["sepen", "sample", "--config", str(config), "--plan", str(plan), "--method", "base"]
    argv += ["--shard", "0", "--shards", "2", "--images-dir", str(images)]
    argv += ["--set", "sampling.steps=2"]
    outs = [tmp_path / f"shard-0-{k}.json" for k in range(2)]
    env = {**os.environ, **_shim_env(SEPEN_TEST_SLOW_WRITE="0.05")}
    procs = [
        subprocess.Popen([*argv, "--out", str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE)
        for out in outs
    ]
    whole, partial, hidden = set(), [], set()
    while any(p.poll() is None for p in procs):
        for f in [*images.rglob("*"), *outs]:
            if not f.is_file():
                continue
            if f.name.startswith("."):
                hidden.add(f.name)
                continue
            try:
                if f.suffix == ".png":
                    with Image.open(f) as picture:
                        picture.load()
                else:
                    json.loads(f.read_bytes())
                whole.add(f)
            except FileNotFoundError:
                continue
            except Exception as err:  # a file seen half-written
                partial.append(f"{f.name}: {err}")
        time.sleep(0.002)
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert not partial
    manifests = [json.loads(out.read_text()) for out in outs]
    assert manifests[0]["images"] == manifests[1]["images"]
    total = sum(map(len, prompts["sets"].values())) * len(prompts["seeds"])
    assert len(manifests[0]["images"]) == total // 2 == 16  # shard 0 of 2
    paths = {Path(im["path"]) for im in manifests[0]["images"]}
    assert paths <= whole  # the reader saw every image, each whole
    assert sum(n.startswith(".seed-") for n in hidden) >= 10  # and it looked during writes
    leftovers = [p for p in images.rglob(".*") if p.name not in (".settings", ".lock")]
    assert not leftovers


@pytest.mark.slow
def test_a_two_process_finetune_from_the_rule_equals_one_process(smoke_run, tmp_path_factory):
    from safetensors.torch import load_file

    snake_project, _ = smoke_run
    project = copy_project(tmp_path_factory.mktemp("ddp"))
    smoke = load_config(ROOT / SMOKE)  # layered: written out whole
    smoke["finetune"].update(processes=2, batch_size=1)  # the same global batch of 2
    (project / "ddp.yaml").write_text(yaml.safe_dump(smoke))
    target = "results/smoke/models/joint.safetensors"
    done = snakemake(project, target, "-p", "--configfile", "ddp.yaml")
    out = done.stdout + done.stderr
    assert "accelerate launch --multi_gpu --num_processes 2" in out
    log = (project / "logs/smoke/finetune/joint.log").read_text()
    assert "trained weights identical on 2 process(es)" in log
    two, one = load_file(project / target), load_file(snake_project / target)
    assert two.keys() == one.keys()
    assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-5


@pytest.mark.slow
def test_a_hand_run_accelerate_launch_on_two_machines_equals_one_process(
    smoke_run, tmp_path_factory
):
    """docs/cluster.md's `accelerate launch --num_machines 2 --machine_rank R ...`, one per
    machine, on loopback (CPU, gloo): the delta equals the one-process smoke run's."""
    import socket

    from safetensors.torch import load_file

    snake_project, _ = smoke_run
    work = tmp_path_factory.mktemp("machines")
    smoke = load_config(ROOT / SMOKE)
    smoke["finetune"]["batch_size"] = 1  # 2 machines x 1 process x 1: the global batch of 2
    (work / "two.yaml").write_text(yaml.safe_dump(smoke))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "joint.safetensors"

    def machine(rank: int) -> subprocess.Popen:
        launch = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2"]
        launch += ["--machine_rank", str(rank), "--num_processes", "2"]
        launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        finetune = ["-m", "sepen", "finetune", "--cpu", "--config", str(work / "two.yaml")]
        finetune += ["--plan", str(snake_project / "results/smoke/prompts.json")]
        finetune += ["--model-id", "joint", "--out", str(out), "--state-dir", str(work / "s")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            launch + finetune, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    machines = [machine(0), machine(1)]
    logs = [m.communicate(timeout=900)[0].decode() for m in machines]
    assert [m.returncode for m in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "process 1 of 2" in logs[1]
    two = load_file(out)
    one = load_file(snake_project / "results/smoke/models/joint.safetensors")
    assert two.keys() == one.keys()
    assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-5


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    from helpers.slurm_cluster import LocalSlurm, Unavailable, ensure_installed

    try:
        ensure_installed()
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except Unavailable as err:
        pytest.skip(f"no local SLURM: {err}")
    yield cluster
    cluster.stop()


def _test_profile(project: Path) -> None:
    """profiles/test-slurm: the shipped profile with the test cluster's partition, no account
    and CPUs only."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"] = {
        "slurm_partition": "test",
        "mem_mb": 2000,
        "runtime": 30,
        "cpus_per_task": 1,
    }
    profile.pop("set-resources")
    profile.update(
        {"slurm-no-account": True, "jobs": 4, "slurm-init-seconds-before-status-checks": 1}
    )
    (project / "profiles/test-slurm").mkdir()
    (project / "profiles/test-slurm/config.yaml").write_text(yaml.safe_dump(profile))


@pytest.mark.slow
@pytest.mark.slurm
def test_a_finetune_job_across_two_nodes_equals_one_process(
    smoke_run, local_slurm, tmp_path_factory
):
    """finetune.nodes: 2 through the profile: one allocation of 2 nodes, srun starts a task on
    each, sepen maps SLURM's task variables to torch.distributed's; the delta equals the
    one-process smoke run's (the same global batch of 2)."""
    from safetensors.torch import load_file

    snake_project, _ = smoke_run
    project = copy_project(tmp_path_factory.mktemp("nodes"))
    _test_profile(project)
    smoke = load_config(ROOT / SMOKE)
    smoke["finetune"].update(nodes=2, batch_size=1)
    (project / "nodes.yaml").write_text(yaml.safe_dump(smoke))
    target = "results/smoke/models/joint.safetensors"
    cmd = ["snakemake", target, "--profile", "profiles/test-slurm", "--configfile", "nodes.yaml"]
    before = len(local_slurm.completed_jobs())
    done = subprocess.run(
        cmd + ONE_THREAD, cwd=project, env=local_slurm.env, capture_output=True, text=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    records = local_slurm.completed_jobs()[before:]
    fields = [dict(f.split("=", 1) for f in r.split() if "=" in f) for r in records]
    across = [f for f in fields if f["NodeCnt"] == "2"]
    assert len(across) == 1 and across[0]["NodeList"] == "n[1-2]"  # the finetune job
    assert all(f["NodeCnt"] == "1" for f in fields if f is not across[0])  # concepts, prompts
    log = (project / "logs/smoke/finetune/joint.log").read_text()
    assert re.search(r"^0: .*process 0 of 2 on node n1$", log, re.M)
    assert re.search(r"^1: .*process 1 of 2 on node n2$", log, re.M)
    assert "trained weights identical on 2 process(es)" in log
    two = load_file(project / target)
    one = load_file(snake_project / target)
    assert two.keys() == one.keys()
    assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-5


@pytest.mark.slow
@pytest.mark.slurm
def test_smoke_run_through_the_slurm_profile_matches_the_local_run(
    smoke_run, local_slurm, tmp_path_factory
):
    from safetensors.torch import load_file

    snake_project, _ = smoke_run
    project = copy_project(tmp_path_factory.mktemp("cluster"))
    _test_profile(project)
    before = len(local_slurm.completed_jobs())
    # the pipeline up to its metrics (16 jobs: finetuning, sampling and metrics shards); the
    # report's jobs are the same kind of job and run locally in the other tests
    target = "results/smoke/metrics.json"
    cmd = ["snakemake", target, "--profile", "profiles/test-slurm", "--configfile", SMOKE]
    cmd += ONE_THREAD
    # one sampling job dies after its 3rd image (a preempted job); the profile's retries
    # resume it on the cluster
    marker = project / "killed-sample.json"
    env = {**local_slurm.env, **_kill_once_env(marker, 3)}
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    manifest, _ = _killed_shard(project, marker)
    assert json.loads(manifest.read_text())["reused"] >= 3
    jobs = job_counts(done.stdout + done.stderr)
    records = local_slurm.completed_jobs()[before:]
    submitted = sum(n for rule, n in jobs.items() if rule != "all")  # `all` runs locally
    assert submitted >= 15 and len(records) == submitted
    assert all("Partition=test" in r for r in records)
    r, s = project / "results/smoke", snake_project / "results/smoke"
    ours, local = (
        load_file(r / "models/joint.safetensors"),
        load_file(s / "models/joint.safetensors"),
    )
    assert all(torch_equal(ours[k], local[k]) for k in ours)
    assert (
        json.loads((r / "metrics.json").read_text())["sets"]
        == json.loads((s / "metrics.json").read_text())["sets"]
    )


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
