"""How a training job starts, as a function of the resources its rule was given.

One process: ``python``. One node with N ranks: ``torchrun --standalone`` (FSDP2 over the node's
GPUs). M nodes: one torchrun per node through ``srun``, rendezvous on the first node (with the Slurm
plugin's ``mpi: srun`` the job runs the rule's shell once, on that node, so ``$(hostname)`` is the
rendezvous host; ``-n`` is passed because the job step clears ``SLURM_NTASKS``). The rule appends
``-m opdgeom train ...``.

Threads: Snakemake exports the job's threads (the profile sets them to the CPUs Slurm gives a node)
as ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` among others, and torchrun
passes them unchanged to every rank (it sets ``OMP_NUM_THREADS=1`` only when it is unset), so 8 ranks
would each start 64 threads on 64 CPUs. Under torchrun each rank gets its share of the node instead:
``cpus_per_node // nproc_per_node`` (at least 1) in all three (torch's MKL build takes its thread count
from ``MKL_NUM_THREADS`` when both are set), exported before the launcher so that srun carries them to
every node. Rule train passes the CPUs Slurm allocates per node
(``cpus_per_task``; the job's threads where no profile sets it); a caller on the node itself (the GPU
smoke benchmark) may leave it out: the CPUs this process may run on.
"""

from __future__ import annotations

import os

RENDEZVOUS_PORT = 29500
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_rank(cpus_per_node: int, nproc_per_node: int) -> int:
    if cpus_per_node < 1:
        raise ValueError(f"a training job needs at least one CPU per node, got cpus_per_task={cpus_per_node}")
    return max(1, cpus_per_node // nproc_per_node)


def launch_command(
    nodes: int, nproc_per_node: int, cpus_per_node: int | None = None, port: int = RENDEZVOUS_PORT
) -> str:
    if nodes < 1 or nproc_per_node < 1:
        raise ValueError(f"a training job needs at least one node and one process, got {nodes} x {nproc_per_node}")
    if cpus_per_node is None:
        cpus_per_node = len(os.sched_getaffinity(0))
    per_rank = threads_per_rank(cpus_per_node, nproc_per_node)
    threads = " ".join(f"{name}={per_rank}" for name in THREAD_VARIABLES)
    if nodes > 1:
        return (
            f"{threads} srun -n {nodes} --ntasks-per-node=1 torchrun --nnodes={nodes} "
            f"--nproc-per-node={nproc_per_node} --rdzv-backend=c10d --rdzv-endpoint=$(hostname):{port}"
        )
    if nproc_per_node > 1:
        return f"{threads} torchrun --standalone --nproc-per-node {nproc_per_node}"
    return "python"
