"""Checkpoints of a run: the trainer state for resuming, and the HF folders the diagnostics read.

Trainer state goes through ``torch.distributed.checkpoint`` (DCP): under FSDP each rank writes and
reads only its own shards of the fp32 weights, of AdamW's moments and of a method's state (a lagged
behaviour copy), so resuming never gathers the optimizer anywhere. With one process the same calls
write one file. The small part (fingerprint, step, records, schedule) is a ``meta.pt`` beside it.
The state of step N is written to a temporary folder and renamed over the previous one only when
every rank has finished, so a job killed mid-write resumes from the last complete state.

The weights the diagnostics and evaluation read are exported separately as a bf16 HF folder,
streamed tensor by tensor: every rank gathers one tensor at a time (a collective), rank 0 casts it
and appends it to the current safetensors shard, so no rank holds more than one shard of bf16.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from opdgeom.io import atomic_dir
from opdgeom.train.distributed import World, barrier, full_tensor

STATE_DIR = "trainer_state"
META_FILE = "meta.pt"
SHARD_BYTES = 4 << 30  # safetensors shard size of exported weights (HF's default is 5 GB)


class NonFiniteError(RuntimeError):
    """Loss, gradient or weights went NaN/Inf; the run stops before writing a bad checkpoint."""


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process whenever no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model, optimizer, method) -> dict:
    """The DCP state dict: sharded (DTensor) entries under FSDP, plain tensors in one process."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "method": method.state_dict()}


def save_trainer_state(run_dir: Path, model, optimizer, method, meta: dict, world: World) -> None:
    """Write ``run_dir/trainer_state/`` (every rank its shards) and ``meta.pt``, replacing the last one."""
    final, tmp = run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.tmp"
    if world.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(world)
    with _single_process_quiet():
        dcp.save(_state(model, optimizer, method), checkpoint_id=tmp)
    barrier(world)  # every rank's shards are on disk before the folder becomes the state
    if world.is_main:
        torch.save(meta, tmp / META_FILE)
        retired = run_dir / f".{STATE_DIR}.old"
        if final.exists():
            os.replace(final, retired)
        os.replace(tmp, final)
        if retired.exists():
            shutil.rmtree(retired)
    barrier(world)


def read_meta(run_dir: Path) -> dict | None:
    path = run_dir / STATE_DIR / META_FILE
    return torch.load(path, weights_only=False) if path.exists() else None


def load_trainer_state(run_dir: Path, model, optimizer, method) -> None:
    """Fill model, optimizer and method in place from ``run_dir/trainer_state/`` (each rank its shards)."""
    state = _state(model, optimizer, method)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=run_dir / STATE_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    method.load_state_dict(state["method"])


def full_trainer_state(run_dir: Path) -> dict:
    """The whole saved state as plain CPU tensors (``{"model": ..., "optimizer": ..., "method": ...}``),
    for inspection and tests; one process reads every shard."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = run_dir / f".{STATE_DIR}.full.pt"
    with _single_process_quiet():
        dcp_to_torch_save(run_dir / STATE_DIR, target)
    try:
        return torch.load(target, weights_only=False)
    finally:
        target.unlink()


def _shard_plan(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
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


def export_hf(
    model, tokenizer, out_dir: Path, world: World, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write ``out_dir`` as an HF folder (config, tokenizer, safetensors in ``dtype``), atomically.

    Every rank takes part (each tensor is gathered from its shards); only rank 0 writes. Tied weights
    are written once, under the embedding's name, as transformers does. A non-finite value stops the
    export on every rank before anything is renamed into place.
    """
    # named_parameters lists a tied weight once; persistent buffers complete the state dict.
    persistent = set(model.state_dict())
    tensors = [(n, p) for n, p in model.named_parameters() if n in persistent]
    tensors += [(n, b) for n, b in model.named_buffers() if n in persistent]
    groups = _shard_plan(tensors, dtype, shard_bytes)
    by_name = dict(tensors)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    if len(groups) == 1:
        names = ["model.safetensors"]
    with atomic_dir(out_dir) if world.is_main else nullcontext() as tmp:
        weight_map = {}
        for file, group in zip(names, groups):
            shard = {}
            for name in group:
                value = full_tensor(by_name[name].detach())
                if not torch.isfinite(value).all():
                    raise NonFiniteError(f"parameter {name} has non-finite values; not saving {out_dir}")
                if world.is_main:
                    shard[name] = value.to("cpu", dtype).contiguous()
                    weight_map[name] = file
            if world.is_main:
                save_file(shard, tmp / file, metadata={"format": "pt"})
        if world.is_main:
            if len(names) > 1:
                total = sum(by_name[n].numel() for n in weight_map) * dtype.itemsize
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            model.config.dtype = dtype
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    barrier(world)
    return out_dir
