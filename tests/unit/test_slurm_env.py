"""SLURM's task variables mapped to torch.distributed's for a multi-node finetuning job."""

import pytest

from sepen.errors import SepenError
from sepen.finetune.slurm import expand_nodelist, node_name, tasks_per_node, torch_env

# what srun sets for the second task of `srun --nodes 2 --ntasks 4 --ntasks-per-node 2` in job 4242
TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURMD_NODENAME": "gpu08",
}


def test_node_lists_and_tasks_per_node_expand_as_slurm_writes_them():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("n[1-2]") == ["n1", "n2"]
    assert expand_nodelist("a1,b[9-10]x") == ["a1", "b9x", "b10x"]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(SepenError, match="node list 'n\\[3-1\\]' at '3-1'.*MASTER_ADDR"):
        expand_nodelist("n[3-1]")
    with pytest.raises(SepenError, match="tasks per node '2\\(y2\\)'"):
        tasks_per_node("2(y2)")


def test_an_srun_task_gets_rank_world_and_the_first_nodes_rendezvous():
    asked = []
    env = torch_env(TASK, address=lambda name: asked.append(name) or "10.0.0.7")
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": str(20000 + 4242),
    }
    assert asked == ["gpu07"]  # rank 0's node: the step's first
    # every task of the step computes the same rendezvous
    first = torch_env({**TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"},
                      address=lambda name: "10.0.0.7")  # fmt: skip
    assert (first["MASTER_ADDR"], first["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])
    assert torch_env({**TASK, "SLURM_JOB_ID": "64242"}, lambda n: "x")["MASTER_PORT"] == "24242"
    assert node_name(TASK) == "gpu08"


@pytest.mark.parametrize(
    "change",
    [
        {"RANK": "0"},  # accelerate launch / torchrun set them: nothing changes
        {"MASTER_ADDR": "node1"},
        {"SLURM_STEP_NUM_TASKS": "1"},  # the plugin's own `srun -n1`: one process
    ],
)
def test_a_launcher_or_a_one_task_step_is_left_alone(change):
    assert torch_env({**TASK, **change}, address=lambda name: "unused") == {}
    assert torch_env({"PATH": "/bin"}, address=lambda name: "unused") == {}
