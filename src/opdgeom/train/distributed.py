"""Data-parallel training under torchrun: FSDP2 (fully_shard) when WORLD_SIZE > 1, NCCL on GPUs,
gloo on CPU. With one process every helper here is the identity, so the single-process loop is
the same code path, not a copy.

Each rank trains on its slice of the global batch (rows rank, rank + W, ...); token-mean losses
divide by the global token count times 1/W because FSDP averages gradients over ranks, so W ranks
take the same step as one process on the whole batch (up to float summation order).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def local_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def setup() -> World:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any.

    One process trains on the GPU when there is one (a Slurm job granted --gpus=1), else on CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=local_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = local_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    node = os.environ.get("SLURMD_NODENAME", "-")
    print(f"rank {rank}/{size} on {socket.gethostname()} (Slurm node {node}): {device}, {backend}", file=sys.stderr)
    return World(rank=rank, size=size, device=device)


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(model, world: World):
    """FSDP2: shard each decoder layer, then the root (embeddings, norm, lm_head)."""
    if world.size == 1:
        return model.to(world.device)
    from torch.distributed.fsdp import fully_shard

    model.to(world.device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def local_rows(rows: list, world: World) -> list:
    if len(rows) % world.size:
        raise ValueError(f"global batch of {len(rows)} does not split over {world.size} ranks")
    return rows[world.rank :: world.size]


def global_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return value
    value = value.detach().clone().to(world.device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def full_tensor(value):
    """A DTensor (FSDP-sharded parameter, or a norm computed over them) as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_model_state(model, world: World, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered from every rank under FSDP.

    By default on the CPU, and under FSDP only rank 0 gets them (the others an empty dict): what a
    checkpoint needs. ``everywhere`` keeps them on the training device on every rank instead: what
    a replicated copy (the lagged behaviour policy) needs.
    """
    if world.size == 1:
        state = model.state_dict()
        return state if everywhere else {k: v.detach().cpu() for k, v in state.items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model, optimizer, world: World) -> dict:
    if world.size == 1:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, world: World) -> None:
    if world.size == 1:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
