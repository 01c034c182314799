"""How a training job starts, as a function of the resources its rule was given.

One process: ``python``. One node with N ranks: ``torchrun --standalone`` (FSDP2 over the node's
GPUs). M nodes: one torchrun per node through ``srun``, rendezvous on the first node (with the Slurm
plugin's ``mpi: srun`` the job runs the rule's shell once, on that node, so ``$(hostname)`` is the
rendezvous host; ``-n`` is passed because the job step clears ``SLURM_NTASKS``). The rule appends
``-m opdgeom train ...``.
"""

from __future__ import annotations

RENDEZVOUS_PORT = 29500


def launch_command(nodes: int, nproc_per_node: int, port: int = RENDEZVOUS_PORT) -> str:
    if nodes < 1 or nproc_per_node < 1:
        raise ValueError(f"a training job needs at least one node and one process, got {nodes} x {nproc_per_node}")
    if nodes > 1:
        return (
            f"srun -n {nodes} --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc-per-node={nproc_per_node} "
            f"--rdzv-backend=c10d --rdzv-endpoint=$(hostname):{port}"
        )
    if nproc_per_node > 1:
        return f"torchrun --standalone --nproc-per-node {nproc_per_node}"
    return "python"
