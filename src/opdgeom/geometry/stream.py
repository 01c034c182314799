"""Iterate matching tensors of Hugging Face safetensors checkpoints, one tensor at a time.

A Qwen3-8B pair is ~32 GB of bf16 against 24 GB of RAM, so nothing here ever loads a
whole model: headers are parsed up front (cheap, and it lets a bad checkpoint fail
before hours of work rather than in the middle), then tensors are read lazily through
``safetensors.safe_open``. Every problem is a ``CheckpointError`` naming file and tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from opdgeom.geometry.bits import has_nonfinite

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A safetensors header larger than this is corrupt rather than real (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
FINITE_CHECK_NUMEL = 1 << 22

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in")
LM_HEAD_NAMES = ("lm_head", "embed_out")
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be compared: the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """What a parameter is, from its name: kind in matrix/embedding/lm_head/vector."""

    kind: str
    layer: int | None
    module: str


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lives on disk, as its file header declares it."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorPair:
    """One tensor of checkpoint A and its counterpart in checkpoint B."""

    name: str
    info: TensorInfo
    w0: torch.Tensor
    w1: torch.Tensor


def classify(name: str, ndim: int | None = None) -> TensorInfo:
    """Kind, layer index and module type of a HF parameter name (Qwen3/Qwen2/Llama/Mistral/GPT-2).

    ``ndim`` (when known) overrides the name: any 1-D tensor is a "vector". Without it,
    biases and ``*norm*`` weights are vectors. Biases get module "<module>.bias" so a
    per-module aggregate never mixes a projection with its bias.
    """
    parts = name.split(".")
    suffix = parts[-1] if len(parts) > 1 and parts[-1] in ("weight", "bias") else None
    module = parts[-2] if suffix else parts[-1]
    match = LAYER_PATTERN.search(name)
    layer = int(match.group(1)) if match else None
    if any(p in LM_HEAD_NAMES for p in parts):
        kind = "lm_head"
    elif any(p in EMBEDDING_NAMES for p in parts):
        kind = "embedding"
    elif ndim == 1 or (ndim is None and (suffix == "bias" or "norm" in module.lower() or module.startswith("ln"))):
        kind = "vector"
    else:
        kind = "matrix"
    if suffix == "bias":
        module = f"{module}.bias"
    return TensorInfo(kind=kind, layer=layer, module=module)


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors header against the file's real size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(declares {header_len} header bytes, file has {size})"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    data_bytes = size - 8 - header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry {meta!r}") from exc
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs data bytes up to {end}, file holds {data_bytes}"
            )
        expected = math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if dtype in DTYPE_BYTES and end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name}: {end - begin} data bytes for {dtype}{list(shape)} (expected {expected})"
            )
        entries[name] = TensorEntry(name=name, path=path, dtype=dtype, shape=shape)
    return entries


def read_checkpoint(folder: str | Path) -> dict[str, TensorEntry]:
    """All tensors of a HF model folder (single file or sharded index), headers checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    index_path = folder / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc})") from exc
        headers = {}
        entries = {}
        for name, shard in weight_map.items():
            shard_path = folder / shard
            if shard not in headers:
                if not shard_path.is_file():
                    raise CheckpointError(f"{shard_path}: shard missing (index maps tensor {name} to it)")
                headers[shard] = _read_header(shard_path)
            if name not in headers[shard]:
                raise CheckpointError(f"{shard_path}: tensor {name} is in {INDEX_FILE} but not in this shard")
            entries[name] = headers[shard][name]
        return entries
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return _read_header(single)


def _sort_key(name: str) -> tuple[int, str]:
    match = LAYER_PATTERN.search(name)
    return (int(match.group(1)) if match else -1, name)


def check_finite(tensor: torch.Tensor, entry: TensorEntry) -> None:
    """Raise if a floating tensor holds NaN or Inf (chunked, so no full-size temporary)."""
    if not tensor.is_floating_point():
        return
    flat_n = tensor.reshape(-1)
    for start in range(0, flat_n.numel(), FINITE_CHECK_NUMEL):
        if has_nonfinite(flat_n[start : start + FINITE_CHECK_NUMEL]):
            raise CheckpointError(f"{entry.path}: tensor {entry.name} has non-finite values (NaN or Inf)")


def load_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor (finite-checked), opening its file for this read only.

    safe_open maps the whole file; a handle kept open for a run kept every page it had
    touched resident, so peak RSS grew by ~1 GiB per Qwen3-8B-shaped layer pair. Reopening
    costs one header parse per tensor (well under a millisecond) and bounds memory by the
    tensors in use.
    """
    try:
        with safe_open(str(entry.path), framework="pt") as handle:
            tensor = handle.get_tensor(entry.name)
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(f"{entry.path}: tensor {entry.name}: cannot load ({exc})") from exc
    check_finite(tensor, entry)
    return tensor


def iter_tensors(folder: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of one checkpoint lazily, layer by layer."""
    entries = read_checkpoint(folder)
    wanted = sorted(entries if names is None else names, key=_sort_key)
    missing = [n for n in wanted if n not in entries]
    if missing:
        raise CheckpointError(f"{folder}: tensors not found: {', '.join(missing[:10])}")
    for name in wanted:
        yield name, load_tensor(entries[name])


def check_pair(entries_a: dict[str, TensorEntry], entries_b: dict[str, TensorEntry], dir_a, dir_b) -> None:
    """Same tensor names and shapes on both sides, else a CheckpointError listing the differences."""
    only_a = sorted(set(entries_a) - set(entries_b), key=_sort_key)
    only_b = sorted(set(entries_b) - set(entries_a), key=_sort_key)
    if only_a or only_b:
        lines = [f"tensor names differ between {dir_a} and {dir_b}"]
        if only_a:
            lines.append(f"only in {dir_a}: {', '.join(only_a[:20])}" + (" ..." if len(only_a) > 20 else ""))
        if only_b:
            lines.append(f"only in {dir_b}: {', '.join(only_b[:20])}" + (" ..." if len(only_b) > 20 else ""))
        raise CheckpointError("; ".join(lines))
    for name in sorted(entries_a, key=_sort_key):
        a, b = entries_a[name], entries_b[name]
        if a.shape != b.shape:
            raise CheckpointError(f"tensor {name}: shape {list(a.shape)} in {a.path} vs {list(b.shape)} in {b.path}")


class FolderCheckpoint:
    """A HF safetensors folder (single file or sharded index) as a checkpoint source.

    A checkpoint source is anything with ``entries`` (name -> TensorEntry: shape, dtype, file) and
    ``load(name)``; opdgeom.diagnose builds others (renamed views, LoRA adapters over a base) and
    passes them wherever a folder is accepted. ``str()`` of a source names it in error messages.
    """

    def __init__(self, folder: str | Path):
        self.folder = folder
        self.entries = read_checkpoint(folder)

    def load(self, name: str) -> torch.Tensor:
        return load_tensor(self.entries[name])

    def __str__(self) -> str:
        return str(self.folder)


def as_checkpoint(source) -> FolderCheckpoint:
    """A checkpoint source as it is, or a folder path opened as a FolderCheckpoint."""
    if hasattr(source, "entries") and hasattr(source, "load"):
        return source
    return FolderCheckpoint(source)


def iter_tensor_pairs(dir_a, dir_b, names: Iterable[str] | None = None) -> Iterator[TensorPair]:
    """Yield matching tensors of two checkpoints (folders or checkpoint sources), one pair at a time.

    Headers, file sizes, tensor names and shapes are all validated before the first
    yield; non-finite values are found as each tensor is read (checking them up front
    would mean reading both checkpoints twice).
    """
    source_a, source_b = as_checkpoint(dir_a), as_checkpoint(dir_b)
    entries_a, entries_b = source_a.entries, source_b.entries
    check_pair(entries_a, entries_b, source_a, source_b)
    wanted = sorted(entries_a if names is None else names, key=_sort_key)
    missing = [n for n in wanted if n not in entries_a]
    if missing:
        raise CheckpointError(f"{source_a}: tensors not found: {', '.join(missing[:10])}")
    for name in wanted:
        entry_a = entries_a[name]
        w0, w1 = source_a.load(name), source_b.load(name)
        yield TensorPair(name=name, info=classify(name, len(entry_a.shape)), w0=w0, w1=w1)


class CheckpointSeries:
    """Several checkpoints of one architecture (a training trajectory), read one tensor at a time.

    Each item is a folder or a checkpoint source (see FolderCheckpoint). All headers are validated
    against the first checkpoint on construction; each load opens its file for that read only
    (see load_tensor), so there is nothing to close.
    """

    def __init__(self, folders: Iterable):
        self.sources = [as_checkpoint(f) for f in folders]
        if not self.sources:
            raise CheckpointError("no checkpoints given")
        first = self.sources[0]
        for source in self.sources[1:]:
            check_pair(first.entries, source.entries, first, source)
        self.names = sorted(first.entries, key=_sort_key)

    def __len__(self) -> int:
        return len(self.sources)

    def info(self, name: str) -> TensorInfo:
        return classify(name, len(self.sources[0].entries[name].shape))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.sources[0].entries[name].shape

    def load(self, index: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of checkpoint number ``index`` (finite-checked)."""
        return self.sources[index].load(name)
