# Shared definitions: the validated config, the experiment's plan, paths and helpers.
import hashlib
import json
import os

from sepen.plan import build_plan
from sepen.plan import attention_prompts
from sepen.workflow import (
    command_config_path,
    code_hash,
    step_params,
)

# CFG: the validated config (the Snakefile's; a bad key stops the run before any job)
EXP = CFG["experiment"]
R = f"results/{EXP}"
LOGS = f"logs/{EXP}"
BENCH = f"benchmarks/{EXP}"
CONFIG = command_config_path(workflow, CFG, R)
PLAN = build_plan(CFG)
MODELS = sorted(PLAN["models"])
METHODS = CFG["evaluation"]["methods"]
SHARDS = list(range(CFG["evaluation"]["shards"]))
METRICS = CFG["evaluation"]["metrics"]
TOY = CFG["evaluation"]["prompts"] == "toy"
PRETRAIN = TOY and CFG["toy"]["pretrain"]["run"]
STUDY = TOY and CFG["toy"]["study"]["run"]
CARD_RUN = TOY and CFG["toy"]["card"]["run"]
BASE = f"{R}/toy_base" if PRETRAIN else CFG["model"]["pretrained"]
# a local base model folder is an input (a change re-runs what uses it); a hub id is not
BASE_INPUT = [BASE] if PRETRAIN or os.path.isdir(BASE) else []
MODEL_ARG = f" --model {BASE}" if PRETRAIN else ""
# the rules' software with `--software-deployment-method conda`
CONDA_ENV = "../envs/sepen.yaml"
# GPUs a job asks for: none for the toy world, one otherwise (profiles may change it)
GPU = 0 if TOY else 1
# nodes of a finetuning job (above 1: one SLURM allocation, srun tasks; docs/cluster.md)
NODES = CFG["finetune"]["nodes"]
# processes (GPUs) per node of a finetuning job
PER_NODE = CFG["finetune"]["processes"] or 1


wildcard_constraints:
    model="[A-Za-z0-9_-]+",
    method="|".join(METHODS),
    shard=r"\d+",


def shard_models(wildcards):
    """The deltas a sepen sampling shard needs: the models of its prompts."""
    if wildcards.method != "sepen":
        return []
    ids = PLAN["order"][int(wildcards.shard) :: len(SHARDS)]
    models = sorted({PLAN["prompts"][p]["model"] for p in ids} - {None})
    return [f"{R}/models/{m}.safetensors" for m in models]


def attention_models():
    """Deltas of the prompts shown in the attention figure."""
    if "sepen" not in METHODS:
        return []
    ids = attention_prompts(PLAN, CFG["report"]["attention_prompts"])
    models = sorted({PLAN["prompts"][p]["model"] for p in ids} - {None})
    return [f"{R}/models/{m}.safetensors" for m in models]


def manifests():
    return [f"{R}/samples/{m}/shard-{s}.json" for m in METHODS for s in SHARDS]


def metric_files():
    return [f"{R}/metrics/{m}/shard-{s}.json" for m in METHODS for s in SHARDS]


def plan_data():
    """The data files the plan reads."""
    ev = CFG["evaluation"]
    if ev["prompts"] in ("attend_excite", "custom"):
        return [ev["prompt_file"]]
    if ev["prompts"] == "large_scale":
        return [ev["prompt_file"], ev["concept_file"]]
    return []


def premise_deltas():
    """The deltas of the premise check: every model of the plan (with the sepen method)."""
    if "sepen" not in METHODS:
        return []
    return [f"{R}/models/{m}.safetensors" for m in MODELS]


def card_file():
    """The base model's world card: measured in the DAG (toy.card.run) or shipped beside the
    model; [] when there is none."""
    if not TOY:
        return []
    if CARD_RUN:
        return f"{R}/world_card.json"
    shipped = os.path.join(BASE, "world_card.json")
    return shipped if os.path.isfile(shipped) else []


def table_inputs():
    out = {"metrics": f"{R}/metrics.json"}
    if card_file():
        out["card"] = card_file()
    if TOY and CFG["toy"]["premise_images"]:
        out["premise"] = f"{R}/premise.json"
    if STUDY:
        out["study"] = f"{R}/study/study.json"
    elif TOY and os.path.isfile(CFG["toy"]["study"]["shipped"]):  # shown when shipped
        out["study"] = CFG["toy"]["study"]["shipped"]
    return out


def table_options(wildcards, input):
    return "".join(
        f" --{k} {input[k]}" for k in ("premise", "study", "card") if k in input.keys()
    )


def fid_files():
    if not CFG["evaluation"]["fid"]["reference"]:
        return []
    return [f"{R}/fid/{m}.json" for m in METHODS]


def finetune_resources():
    """The finetuning job's resources: one node with a GPU per process (finetune.processes,
    else one); with finetune.nodes > 1 an allocation of nodes x processes tasks in the SLURM
    plugin's MPI mode (the rule runs srun), GPUs asked per node (gres), none per task.
    """
    res = {
        "mem_mb": 8000 if TOY else 24000,
        "runtime": 60 if TOY else 240,
        "gpu": GPU * PER_NODE,
    }
    if NODES > 1:
        res.update(nodes=NODES, mpi="srun")  # the plugin forbids tasks_per_node=1
        res.update({"tasks_per_node": PER_NODE} if PER_NODE > 1 else {"tasks": NODES})
        if GPU:
            res.update(gres=f"gpu:{PER_NODE}", gpu=0, tasks_per_gpu=0)
    return res


def finetune_launcher(wildcards, resources, threads):
    """`python -m sepen finetune`, or accelerate's launcher with one process per GPU of the job
    (finetune.processes overrides; several processes without GPUs run gloo on CPU); with
    finetune.nodes > 1, srun with one task per process on every node of the allocation.
    """
    if NODES > 1:
        cpu = "" if GPU else " --cpu"
        cpus = resources.get("cpus_per_gpu") if GPU else resources.get("cpus_per_task")
        cpus = cpus if isinstance(cpus, int) and cpus > 0 else threads
        gres = f" --gres=gpu:{PER_NODE}" if GPU else ""
        return (
            f"srun --nodes {NODES} --ntasks {NODES * PER_NODE} --ntasks-per-node {PER_NODE}"
            f" --cpus-per-task {cpus}{gres} --kill-on-bad-exit=1 --label"
            f" python -m sepen finetune{cpu}"
        )
    gpus = int(resources.get("gpu", 0) or 0)
    processes = CFG["finetune"]["processes"] or max(1, gpus)
    if processes == 1:
        return "python -m sepen finetune"
    port = 29500 + int(hashlib.sha1(wildcards.model.encode()).hexdigest(), 16) % 1000
    cpu = "" if gpus else " --cpu"
    return (
        f"accelerate launch --multi_gpu --num_processes {processes}"
        f" --main_process_port {port} -m sepen finetune{cpu}"
    )
