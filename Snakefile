# sepen: Separate-and-Enhance as a cached DAG. `snakemake --cores all` runs the default
# experiment (config/config.yaml, the toy world); `--configfile config/<paper>.yaml` the
# paper's. Each rule calls one `sepen` command; dvc.yaml calls the same ones.
import os

from snakemake.utils import min_version, validate

from sepen.workflow import workflow_config

min_version("9.0")


# the default experiment; a --configfile given on the command line replaces it. A config may be
# layered over another (`extends: config.yaml`: the paper's, v2 and test configs list only what
# differs from the default run).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# sepen's check first: its message names the bad key, its value and what is allowed
CFG = workflow_config(workflow, config)
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/report.smk"


# the report opens on the answer: the headline numbers of this run (rule report_landing)
# above the description, once the run has made them
LANDING = f"{R}/report/landing.rst"


report: os.path.abspath(LANDING) if os.path.isfile(LANDING) else "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        [f"{R}/metrics.json", f"{R}/report/metrics.html", LANDING] if METRICS else [],
        f"{R}/report/taxonomy.png" if "toy_detection" in METRICS else [],
        f"{R}/report/samples.png",
        f"{R}/report/losses.png" if "sepen" in METHODS else [],
        f"{R}/report/attention.png",
