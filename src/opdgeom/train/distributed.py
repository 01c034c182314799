"""Data-parallel training under torchrun: FSDP2 (fully_shard) when WORLD_SIZE > 1, NCCL on GPUs,
gloo on CPU. With one process every helper here is the identity, so the single-process loop is
the same code path, not a copy.

Each rank trains on its slice of the global batch (rows rank, rank + W, ...); token-mean losses
divide by the global token count times 1/W because FSDP averages gradients over ranks, so W ranks
take the same step as one process on the whole batch (up to float summation order).
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from opdgeom.device import local_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def setup(one_rank_group: bool = False) -> World:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any.

    One process trains on the GPU when there is one (a Slurm job granted --gpus=1), else on CPU; a
    process that was granted GPUs and cannot use CUDA stops here with the reason (``local_device``).
    ``one_rank_group`` gives it a process group of its own, so that FSDP2 (and with it bf16 mixed
    precision) applies to a single rank as well.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        device = local_device()
        if one_rank_group and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = local_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Rank 0 writes each checkpoint shard while the others wait in the next gather: the default
        # 10 minutes can be too short for a 4 GB shard on a busy shared file system.
        minutes = int(os.environ.get("OPDGEOM_COLLECTIVE_TIMEOUT_MIN", "60"))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    node = os.environ.get("SLURMD_NODENAME", "-")
    print(
        f"rank {rank}/{size} on {socket.gethostname()} (Slurm node {node}): {device}, {backend}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    return World(rank=rank, size=size, device=device)


def teardown(world: World) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _plain(world: World) -> bool:
    """One process without a process group: no FSDP. (A caller that creates a one-rank group on purpose,
    as the GPU benchmark does, gets FSDP2 over one rank: the many-rank precision path on one GPU; setup()
    never creates one.)"""
    return world.size == 1 and not dist.is_initialized()


def fsdp_units(model) -> list:
    """The modules ``fully_shard`` is applied to, innermost first: every decoder layer, then the root
    (embeddings, final norm, lm_head). One unit's parameters are all-gathered together, so the largest
    unit bounds the gathered compute copy; the memory plan reads the same list."""
    return [*getattr(model, model.base_model_prefix).layers, model]


@functools.lru_cache(maxsize=None)
def _mesh(world: World):
    """One 1-D device mesh over all ranks per world, shared by the student and the frozen models."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(world.device.type, (world.size,))


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (torch.utils.checkpoint, non-reentrant).

    transformers' GradientCheckpointingLayer wraps the layer's ``forward``, not ``__call__``, so FSDP2's
    hooks stay outside the checkpoint (the layer is gathered once per pass); parameter names are
    unchanged (no checkpoint-wrapper prefix), so state dicts, projections and checkpoints see the same
    keys. Active in train() mode only.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(model, world: World, mixed_precision: str = "fp32", activation_checkpointing: bool = False):
    """FSDP2: shard each decoder layer, then the root (embeddings, norm, lm_head).

    The master weights (and so AdamW's m, v, which follow the parameters) stay fp32, each rank holding
    its dim-0 shard. ``mixed_precision="bf16"`` gathers them as bf16 for forward and backward and
    reduce-scatters gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).
    ``activation_checkpointing`` recomputes each decoder layer in backward. The defaults (fp32, no
    checkpointing) are the path every CPU test and the bitwise-resume guarantee were written for.
    With one process (and no process group) the model is moved to the device and otherwise left as it
    is (bf16 mixed precision needs FSDP's unsharded compute copy, so one plain process asking for it is
    refused).
    """
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {sorted(PRECISIONS)}, got {mixed_precision!r}")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if _plain(world):
        if mixed_precision != "fp32":
            raise ValueError("mixed_precision 'bf16' needs FSDP: torchrun with more than one rank, or a one-rank group")
        return model.to(world.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if model.device.type != "meta":
        model.to(world.device)
    mesh = _mesh(world)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, **kwargs)
    return model


def shard_frozen(model, world: World, dtype: torch.dtype = torch.bfloat16):
    """A frozen model (teacher, anchor, lagged copy) for scoring and sampling: no gradients, stored in
    ``dtype`` (bf16: 2 bytes per parameter), sharded over the ranks and gathered one unit at a time
    (``reshard_after_forward=True`` on every unit, the root included), so no rank ever holds it whole.
    With one process it is the plain model in ``dtype`` on the device."""
    model.requires_grad_(False).eval()
    if model.device.type != "meta":
        model.to(world.device, dtype)
    if _plain(world):
        return model
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    return model


def _restore_buffers(model) -> None:
    """Non-persistent buffers (the rotary inv_freq) are not in checkpoints and are garbage after
    ``to_empty``; rebuild each module that holds them from its config and copy them over."""
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"cannot restore buffers {sorted(buffers)} of {type(module).__name__}")
        fresh = dict(type(module)(config=config).named_buffers(recurse=False))
        for name, buf in buffers.items():
            buf.copy_(fresh[name].to(buf.dtype))


def _safetensors_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded folders have an index json)."""
    import json

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_sharded(
    model_dir: str | Path,
    world: World,
    dtype: torch.dtype = torch.float32,
    frozen: bool = False,
    mixed_precision: str = "fp32",
    activation_checkpointing: bool = False,
):
    """An HF folder loaded straight into its shards: the model is built from its config on the meta
    device (no memory), sharded exactly as ``shard`` (``frozen``: ``shard_frozen``) does, materialised
    empty, and then every rank reads only its own dim-0 rows of each tensor from the safetensors files
    (``safe_open(...).get_slice``). No rank and no host holds the whole model; with 8 ranks on a node
    the host reads each byte once. ``dtype`` is the storage dtype (fp32 master weights for the student,
    bf16 for frozen models). With one process it is a plain load followed by the same wrappers.
    """
    import transformers

    model_dir = Path(model_dir)
    if world.size == 1:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if frozen:
            return shard_frozen(model, world, dtype)
        return shard(model, world, mixed_precision, activation_checkpointing)
    from safetensors import safe_open

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if frozen:
        shard_frozen(model, world, dtype)
    else:
        shard(model, world, mixed_precision, activation_checkpointing)
    model.to_empty(device=world.device)
    _restore_buffers(model)
    files = _safetensors_index(model_dir)
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():  # tied weights appear once (under the embedding's name)
        if name not in files:
            raise KeyError(f"{model_dir}: no tensor {name!r} in the safetensors files")
        by_file.setdefault(files[name], []).append((name, param))
    with torch.no_grad():
        for path, params in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name, param in params:
                    local = param.to_local() if hasattr(param, "to_local") else param
                    rows = f.get_slice(name)
                    dim0 = rows.get_shape()[0]
                    # FSDP2's Shard(0) is torch.chunk: ceil(dim0 / W) rows per rank, the last ranks short or empty.
                    start = min(world.rank * -(-dim0 // world.size), dim0)
                    if local.shape[0]:
                        local.copy_(rows[start : start + local.shape[0]].to(local.dtype))
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


def global_max(value: int, world: World) -> int:
    if world.size == 1:
        return value
    tensor = torch.tensor(value, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
