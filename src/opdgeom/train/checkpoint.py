"""Checkpoints of a run: the trainer state for resuming, and the HF folders the diagnostics read.

Trainer state goes through ``torch.distributed.checkpoint`` (DCP): under FSDP each rank writes and
reads only its own shards of the fp32 weights, of AdamW's moments and of a method's state (a lagged
behaviour copy), so resuming never gathers the optimizer anywhere. With one process the same calls
write one file. The small part (fingerprint, step, records, schedule) is ``meta.json`` beside it.
The state of step N is written to a temporary folder, its ``meta.json`` last (once every rank's
shards are on disk), and the folder is renamed over the previous one: a ``trainer_state/`` holding
``meta.json`` is a complete state, and a job killed mid-write resumes from the last complete one.

Nothing in the state is unpickled freely, since it lies on a shared file system where whoever can
write the run folder could plant a pickle that runs code in the next job: the metadata is JSON; DCP's
own ``.metadata`` index is read by an unpickler that builds DCP's records and nothing else; its
non-tensor entries (optimizer hyper-parameters, a method's step counter) and its tensors are read by
torch's weights-only unpickler. The old ``meta.pt`` pickle is refused (see read_meta).

The weights the diagnostics and evaluation read are exported separately as a bf16 HF folder by
opdgeom.hf_folder, streamed tensor by tensor: every rank gathers one tensor at a time (a collective),
rank 0 casts it and appends it to the current safetensors shard.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from opdgeom.hf_folder import SHARD_BYTES, write_hf_folder
from opdgeom.io import write_bytes
from opdgeom.train.distributed import World, barrier

STATE_DIR = "trainer_state"
META_FILE = "meta.json"
PICKLED_META_FILE = "meta.pt"  # the format before meta.json; refused
META_KEYS = ("fingerprint", "step", "tokens", "records", "wall", "scheduler")
# Everything DCP's .metadata index names (torch 2.13): its record classes, tensor sizes, dtypes and
# layouts, and the checkpoint's path. Building these runs no code beyond their constructors.
_DCP_RECORDS = (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "TensorProperties",
    "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
)  # fmt: skip
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in _DCP_RECORDS),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # where Python 3.13 defines it
}


class TrainerStateError(RuntimeError):
    """A trainer state that is not read, because reading it could run code or it is malformed; the
    message names the file and what to do."""


def _restart_hint(state_dir: Path) -> str:
    return (
        f"Delete {state_dir} to restart this run from step 0 (its step_* checkpoints are written again "
        "as it goes); opdgeom does not convert such a state."
    )


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise TrainerStateError(
            f"{self.path}: names {module}.{name}, which no DCP index holds; not loading it, since "
            f"unpickling it could run code. {_restart_hint(self.path.parent)}"
        )


class _StateReader(dcp.FileSystemReader):
    """FileSystemReader whose ``.metadata`` index is read by _MetadataUnpickler (DCP's own reader calls
    pickle.load on it). The index is read when the reader is made, outside DCP: DCP treats any error
    from read_metadata as "no global index" and falls back to per-rank ones, which would bury a refusal."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir)
        path = Path(self._get_metadata_path())
        with self.fs.create_stream(path, "rb") as stream:
            self._metadata = _MetadataUnpickler(stream, path).load()

    def read_metadata(self, *args, **kwargs):
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainEntries:
    """DCP's planners unpickle non-tensor entries with the full unpickler; these entries are numbers,
    strings, tuples and None, which the weights-only unpickler reads without running code."""

    def __init__(self, state_dir: Path):
        super().__init__()
        self.state_dir = state_dir

    def load_bytes(self, read_item, value) -> None:
        try:
            entry = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            # keep only what torch found, not its advice to turn the check off
            found = re.search(r"WeightsUnpickler error: ([^.]*)", str(err))
            raise TrainerStateError(
                f"{self.state_dir}: entry {read_item.dest_index.fqn} is not plain data "
                f"({found.group(1) if found else 'unreadable'}); not loading it, since unpickling it "
                f"could run code. {_restart_hint(self.state_dir)}"
            ) from None
        if self.flatten_state_dict:  # where DefaultLoadPlanner.load_bytes puts it
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], entry)
        else:
            self.state_dict[read_item.dest_index.fqn] = entry


class _LoadPlanner(_PlainEntries, DefaultLoadPlanner):
    """Fills a state dict of the right shapes (each rank its shards)."""


class _WholeStatePlanner(_PlainEntries, _EmptyStateDictLoadPlanner):
    """Rebuilds the whole state from the index, as torch's dcp_to_torch_save does."""


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process whenever no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextmanager
def _refusals_as_they_are():
    """DCP wraps what a rank raised while reading in a CheckpointException (a BaseException, with
    every rank's traceback); a refusal is re-raised as itself, its message the whole story."""
    try:
        yield
    except CheckpointException as err:
        refusals = [exc for exc, _ in err.failures.values() if isinstance(exc, TrainerStateError)]
        if refusals:
            raise refusals[0] from None
        raise


def _state(model, optimizer, method) -> dict:
    """The DCP state dict: sharded (DTensor) entries under FSDP, plain tensors in one process."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "method": method.state_dict()}


def save_trainer_state(run_dir: Path, model, optimizer, method, meta: dict, world: World) -> None:
    """Write ``run_dir/trainer_state/`` (every rank its shards, then ``meta.json``), replacing the last one.

    ``meta`` holds META_KEYS and must be JSON data (the scheduler's state dict is).
    """
    final, tmp = run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.tmp"
    if world.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(world)
    with _single_process_quiet():
        dcp.save(_state(model, optimizer, method), checkpoint_id=tmp)
    barrier(world)  # every rank's shards are on disk before the folder becomes the state
    if world.is_main:
        # fsync: the shards are synced by DCP, so a meta.json on disk always finds them there.
        write_bytes(json.dumps(meta, allow_nan=False).encode(), tmp / META_FILE, fsync=True)
        retired = run_dir / f".{STATE_DIR}.old"
        if final.exists():
            os.replace(final, retired)
        os.replace(tmp, final)
        if retired.exists():
            shutil.rmtree(retired)
    barrier(world)


def read_meta(run_dir: Path) -> dict | None:
    """The metadata of ``run_dir``'s complete trainer state, or None when it has none.

    A state written before meta.json (its metadata a ``meta.pt`` pickle) is refused, not read.
    """
    state_dir = run_dir / STATE_DIR
    pickled = state_dir / PICKLED_META_FILE
    if pickled.exists():
        raise TrainerStateError(
            f"{pickled}: trainer metadata in the old pickle format, which opdgeom no longer reads: unpickling "
            f"a file from a shared file system runs whatever code its writer put in it. {_restart_hint(state_dir)}"
        )
    path = state_dir / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainerStateError(f"{path}: not JSON ({err}). {_restart_hint(state_dir)}") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise TrainerStateError(f"{path}: lacks {missing}. {_restart_hint(state_dir)}")
    return meta


def load_trainer_state(run_dir: Path, model, optimizer, method) -> None:
    """Fill model, optimizer and method in place from ``run_dir/trainer_state/`` (each rank its shards)."""
    state_dir = run_dir / STATE_DIR
    state = _state(model, optimizer, method)
    with _single_process_quiet(), _refusals_as_they_are():
        dcp.load(state, storage_reader=_StateReader(state_dir), planner=_LoadPlanner(state_dir))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    method.load_state_dict(state["method"])


def full_trainer_state(run_dir: Path) -> dict:
    """The whole saved state as plain CPU tensors (``{"model": ..., "optimizer": ..., "method": ...}``),
    for inspection and tests; one process (outside any process group) reads every shard."""
    state_dir = run_dir / STATE_DIR
    state: dict = {}
    # dcp.load fills only the keys it is given; torch's dcp_to_torch_save makes this same call.
    with _single_process_quiet(), _refusals_as_they_are():
        _load_state_dict(state, _StateReader(state_dir), planner=_WholeStatePlanner(state_dir), no_dist=True)
    return state


def export_hf(
    model, tokenizer, out_dir: Path, world: World, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write ``out_dir`` as an HF folder in ``dtype``: every rank takes part (each tensor is gathered
    from its shards), only rank 0 writes, and no rank returns before the folder is in place."""
    write_hf_folder(model, tokenizer, out_dir, dtype, shard_bytes, write=world.is_main)
    barrier(world)
    return out_dir
