"""The launcher rule train uses, chosen in the package from the job's resources."""

import pytest

from opdgeom.launch import launch_command
from opdgeom.plan import TrainResources


def test_one_process_is_plain_python():
    assert launch_command(1, 1) == "python"


def test_one_node_runs_torchrun_over_its_gpus():
    assert launch_command(1, 8) == "torchrun --standalone --nproc-per-node 8"


def test_several_nodes_run_one_torchrun_per_node_through_srun():
    assert launch_command(2, 8) == (
        "srun -n 2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=8 "
        "--rdzv-backend=c10d --rdzv-endpoint=$(hostname):29500"
    )


def test_no_ranks_is_refused():
    with pytest.raises(ValueError, match="0 x 8"):
        launch_command(0, 8)


def test_job_resources_single_node_asks_for_gpus_and_several_nodes_for_gres_per_node():
    assert TrainResources(1, 8).job_resources() == {"nodes": 1, "nproc_per_node": 8, "gpu": 8}
    assert TrainResources(2, 4).job_resources() == {
        "nodes": 2, "nproc_per_node": 4, "gres": "gpu:4", "tasks": 2, "tasks_per_gpu": 0, "mpi": "srun",
    }  # fmt: skip
