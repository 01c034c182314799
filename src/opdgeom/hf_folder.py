"""The one writer of Hugging Face model folders (config, generation config, tokenizer, safetensors),
used for built models and for every checkpoint a run exports.

Tensors are streamed one at a time: each is gathered whole (a collective under FSDP2: every rank
calls this with ``write`` true on one rank only), cast to ``dtype`` and appended to the current
safetensors shard, so no process holds more than one shard of the cast weights and the caller's fp32
master weights are never touched. Tied weights are written once, under the embedding's name, as
transformers does. A non-finite value stops the write on every rank before anything is renamed into
place; the folder appears whole or not at all.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from opdgeom.dtensor import full_tensor
from opdgeom.io import atomic_dir

SHARD_BYTES = 4 << 30  # safetensors shard size (HF's default is 5 GB)


class NonFiniteError(RuntimeError):
    """Loss, gradient or weights went NaN/Inf; nothing is written from them."""


def shard_plan(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Names grouped into consecutive safetensors shards of at most ``shard_bytes`` (in ``dtype``)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_hf_folder(
    model,
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = SHARD_BYTES,
    write: bool = True,
) -> Path:
    """Write ``out_dir`` as an HF folder in ``dtype``, atomically; ``write=False`` only gathers (the
    other ranks of a sharded model)."""
    out_dir = Path(out_dir)
    # named_parameters lists a tied weight once; persistent buffers complete the state dict.
    persistent = set(model.state_dict())
    tensors = [(n, p) for n, p in model.named_parameters() if n in persistent]
    tensors += [(n, b) for n, b in model.named_buffers() if n in persistent]
    groups = shard_plan(tensors, dtype, shard_bytes)
    by_name = dict(tensors)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    if len(groups) == 1:
        names = ["model.safetensors"]
    with atomic_dir(out_dir) if write else nullcontext() as tmp:
        weight_map = {}
        for file, group in zip(names, groups):
            shard = {}
            for name in group:
                value = full_tensor(by_name[name].detach())
                if not torch.isfinite(value).all():
                    raise NonFiniteError(f"parameter {name} has non-finite values; not saving {out_dir}")
                if write:
                    shard[name] = value.to("cpu", dtype).contiguous()
                    weight_map[name] = file
            if write:
                save_file(shard, tmp / file, metadata={"format": "pt"})
        if write:
            if len(names) > 1:
                total = sum(by_name[n].numel() for n in weight_map) * dtype.itemsize
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            config = model.config
            config.dtype = dtype
            # A model built from a config has no architectures yet (save_pretrained would add it);
            # FSDP2 renames a sharded model's class to FSDP<name>, so the prefix is dropped.
            config.architectures = config.architectures or [type(model).__name__.removeprefix("FSDP")]
            config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out_dir
