"""One finetuning job across nodes on SLURM: the task variables of an `srun` step mapped to
torch.distributed's (docs/cluster.md).

The workflow's multi-node finetune rule runs `srun --nodes N --ntasks N*P ... python -m sepen
finetune`: SLURM starts one task per process and sets SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID
and the step's node list, but no launcher sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
which accelerate reads. `torch_env` derives them: rank and local rank from the task ids, the
world from the step's task count, the address of the step's first node (where rank 0 runs) and
a port from the job id, so that every task of the step computes the same rendezvous. When a
launcher has set them (accelerate launch, torchrun) or the step has one task, it changes nothing.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable, Mapping

from sepen.errors import SepenError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = 20000 + job id mod 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list ("gpu[01-03,07],login1") as names, in order."""
    names, parts, depth, start = [], [], 0, 0
    for i, char in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    for part in filter(None, parts):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if match is None:
            if "[" in part or "]" in part:
                raise SepenError(
                    f"cannot read the SLURM node list {nodelist!r} at {part!r}: set "
                    "MASTER_ADDR to the first node's address before srun"
                )
            names.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            if not high:
                names.append(f"{prefix}{low}{suffix}")
                continue
            if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                raise SepenError(
                    f"cannot read the SLURM node list {nodelist!r} at {item!r}: set "
                    "MASTER_ADDR to the first node's address before srun"
                )
            names += [f"{prefix}{n:0{len(low)}d}{suffix}" for n in range(int(low), int(high) + 1)]
    return names


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node string ("2(x3),1") as one count per node."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise SepenError(
                f"cannot read SLURM's tasks per node {spec!r} at {item!r}: set LOCAL_RANK and "
                "LOCAL_WORLD_SIZE before srun"
            )
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def node_address(name: str) -> str:
    """The address of a node: its name where it resolves, else SLURM's NodeAddr for it."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        pass
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", "-o", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        shown = ""
    match = re.search(r"\bNodeAddr=(\S+)", shown)
    if match is None:
        raise SepenError(
            f"the first node of this SLURM step, {name!r}, has no address this task can find "
            "(its name does not resolve, `scontrol show node` does not list it): set "
            "MASTER_ADDR to its address before srun"
        )
    return match[1]


def torch_env(env: Mapping[str, str], address: Callable[[str], str] = node_address) -> dict:
    """The torch.distributed variables for an srun task, or {} where a launcher set them or
    the step has one task."""
    if any(k in env for k in LAUNCHER_VARIABLES) or "SLURM_PROCID" not in env:
        return {}
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if world <= 1:
        return {}
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = int(env.get("SLURM_NODEID", 0))
    local_world = tasks_per_node(spec)[node] if spec else world // len(nodes)
    job = int(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(local_world),
        "NODE_RANK": str(node),
        "MASTER_ADDR": address(nodes[0]),
        "MASTER_PORT": str(PORT_BASE + job % PORT_SPAN),
    }


def node_name(env: Mapping[str, str]) -> str:
    """This task's node as SLURM names it (SLURMD_NODENAME), else the host's name."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()
