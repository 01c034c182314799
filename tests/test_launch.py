"""The launcher rule train uses, chosen in the package from the job's resources."""

import os
import subprocess
import sys

import pytest

from opdgeom.launch import launch_command
from opdgeom.plan import TrainResources


def test_one_process_is_plain_python():
    assert launch_command(1, 1, 64) == "python"


THREADS_8 = "OMP_NUM_THREADS=8 MKL_NUM_THREADS=8 OPENBLAS_NUM_THREADS=8"


def test_one_node_runs_torchrun_over_its_gpus_with_its_share_of_the_cpus_per_rank():
    assert launch_command(1, 8, 64) == f"{THREADS_8} torchrun --standalone --nproc-per-node 8"


def test_several_nodes_run_one_torchrun_per_node_through_srun():
    assert launch_command(2, 8, 64) == (
        f"{THREADS_8} srun -n 2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=8 "
        "--rdzv-backend=c10d --rdzv-endpoint=$(hostname):29500"
    )


def test_threads_per_rank_round_down_and_never_reach_zero():
    assert launch_command(1, 8, 60).startswith("OMP_NUM_THREADS=7 MKL_NUM_THREADS=7 OPENBLAS_NUM_THREADS=7 ")
    assert launch_command(1, 8, 4).startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ")


def test_without_a_cpu_count_the_ranks_share_the_cpus_this_process_may_use():
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert launch_command(1, 2).startswith(f"OMP_NUM_THREADS={share} MKL_NUM_THREADS={share} ")


def test_no_ranks_is_refused():
    with pytest.raises(ValueError, match="0 x 8"):
        launch_command(0, 8, 64)


def test_no_cpus_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="cpus_per_task=0"):
        launch_command(1, 8, 0)


@pytest.mark.distributed
def test_every_torchrun_rank_gets_its_share_not_the_jobs_threads(tmp_path):
    """As rule train runs it: Snakemake exports the job's threads (here 64) as OMP_NUM_THREADS,
    MKL_NUM_THREADS (which torch's MKL build follows) and others, and torchrun would hand them to every
    rank unchanged; the launch command replaces them per rank."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, torch\n"
        "print(f\"rank {os.environ['RANK']}: {os.environ['OMP_NUM_THREADS']} {torch.get_num_threads()}\")\n"
    )
    snakemake_threads = ("OMP", "GOTO", "OPENBLAS", "MKL", "NUMEXPR")  # what Snakemake's shell() exports
    env = {**os.environ, **{f"{name}_NUM_THREADS": "64" for name in snakemake_threads}}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])  # this venv's torchrun
    cmd = f"{launch_command(1, 2, 4)} {script}"
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0: 2 2",
        "rank 1: 2 2",
    ]


def test_job_resources_single_node_asks_for_gpus_and_several_nodes_for_gres_per_node():
    assert TrainResources(1, 8).job_resources() == {"nodes": 1, "nproc_per_node": 8, "gpu": 8}
    assert TrainResources(2, 4).job_resources() == {
        "nodes": 2, "nproc_per_node": 4, "gres": "gpu:4", "tasks": 2, "tasks_per_gpu": 0, "mpi": "srun",
    }  # fmt: skip
