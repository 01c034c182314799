"""Line up a checkpoint's tensors with the base's: renamed modules, tied embeddings, missing and
extra tensors, dtypes; each is reported by name. A mismatch that makes the comparison meaningless
(a shape, the architecture) raises a ValueError naming the tensor and both files.

The result of aligning is a set of checkpoint sources (see opdgeom.geometry.stream.FolderCheckpoint)
that expose the same tensor names as the base, so compare and trajectory run on them unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from opdgeom.geometry.stream import FolderCheckpoint, TensorEntry, _sort_key, load_tensor

# Wrappers that training frameworks put in front of the model's own names (applied repeatedly).
PREFIXES = ("base_model.model.", "module.", "_orig_mod.", "model.", "transformer.")
LM_HEAD, EMBED = "lm_head.weight", "embed_tokens.weight"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # LoRA tensors formed in float64 (see diagnose.lora)
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def canonical(name: str) -> str:
    """A parameter name without framework and model wrappers: 'layers.0.self_attn.q_proj.weight'."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _list(names, limit: int = 8) -> str:
    names = sorted(names, key=_sort_key)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


class View:
    """A checkpoint source under the base's names: exposed name -> entry of the underlying tensor."""

    def __init__(self, label: str, entries: dict[str, TensorEntry], loader):
        self.label, self.entries, self._load = label, entries, loader

    def load(self, name: str) -> torch.Tensor:
        return self._load(name)

    def __str__(self) -> str:
        return self.label


def by_canonical(folder: Path, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """canonical name -> entry; two tensors that only differ by a wrapper prefix are an error."""
    out: dict[str, TensorEntry] = {}
    for name, entry in entries.items():
        key = canonical(name)
        if key in out:
            raise ValueError(f"{folder}: tensors {out[key].name} and {name} are the same parameter {key}")
        out[key] = entry
    return out


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable config ({exc})") from exc


def check_architecture(base: Path, other: Path) -> None:
    """Both config.json files (where present) describe the same architecture, else a ValueError."""
    a, b = read_config(base), read_config(other)
    for key in ARCH_KEYS:
        if key in a and key in b and a[key] != b[key]:
            raise ValueError(
                f"different architecture: {key} = {a[key]!r} in {base / 'config.json'} "
                f"vs {b[key]!r} in {other / 'config.json'}"
            )


class Aligner:
    """Maps every checkpoint of a run onto the base's tensor names and collects what it had to do."""

    def __init__(self, base_folder: Path):
        self.base_folder = Path(base_folder)
        self.base = FolderCheckpoint(self.base_folder)
        self.base_keys = by_canonical(self.base_folder, self.base.entries)
        self.notes: list[str] = []

    def exposed(self, key: str) -> str:
        """The name a canonical key has in the tables: the base's own name when it has the tensor."""
        entry = self.base_keys.get(key)
        return entry.name if entry is not None else key

    def _tie(self, label: str, keys: dict[str, TensorEntry], want_lm_head: bool) -> None:
        if want_lm_head and LM_HEAD not in keys and EMBED in keys:
            keys[LM_HEAD] = keys[EMBED]
            self.notes.append(f"{label}: no {LM_HEAD} (tied word embeddings): its lm_head is {keys[EMBED].name}")

    def folder_source(self, folder: Path) -> tuple[str, dict[str, TensorEntry], object]:
        """A full HF checkpoint folder as (label, canonical key -> entry, loader); renames reported."""
        check_architecture(self.base_folder, folder)
        keys = by_canonical(folder, FolderCheckpoint(folder).entries)
        renamed = [e.name for k, e in keys.items() if k in self.base_keys and e.name != self.base_keys[k].name]
        if renamed:
            self.notes.append(
                f"{folder}: {len(renamed)} tensors renamed onto the base's names "
                f"(e.g. {renamed[0]} -> {self.base_keys[canonical(renamed[0])].name})"
            )
        return str(folder), keys, load_tensor

    def align(self, sources: list[tuple[str, dict[str, TensorEntry], object]]) -> tuple[View, list[View]]:
        """Base view and one view per checkpoint over the tensors all of them have (same names, checked shapes).

        ``sources``: (label, canonical key -> entry, loader(entry) -> tensor) per checkpoint.
        """
        base_keys = dict(self.base_keys)
        any_lm_head = LM_HEAD in base_keys or any(LM_HEAD in keys for _, keys, _ in sources)
        self._tie(str(self.base_folder), base_keys, any_lm_head)
        for label, keys, _ in sources:
            self._tie(label, keys, any_lm_head)
        common = set(base_keys)
        for _, keys, _ in sources:
            common &= set(keys)
        for label, keys in [(str(self.base_folder), base_keys)] + [(lab, k) for lab, k, _ in sources]:
            left_out = set(keys) - common
            if left_out:
                self.notes.append(f"{label}: not diagnosed (absent elsewhere): {_list(keys[k].name for k in left_out)}")
        if not common:
            raise ValueError(f"no tensor of {self.base_folder} is in the checkpoints ({sources[0][0]} ...)")
        self._check_shapes(base_keys, sources, common)
        self._note_dtypes(base_keys, sources, common)
        base_view = _view(str(self.base_folder), base_keys, common, self.exposed, load_tensor)
        views = [_view(label, keys, common, self.exposed, loader) for label, keys, loader in sources]
        return base_view, views

    def _check_shapes(self, base_keys, sources, common) -> None:
        for label, keys, _ in sources:
            for key in sorted(common, key=_sort_key):
                a, b = base_keys[key], keys[key]
                if tuple(a.shape) != tuple(b.shape):
                    raise ValueError(
                        f"tensor {self.exposed(key)}: shape {list(a.shape)} in {a.path} vs "
                        f"{list(b.shape)} in {b.path} ({label}): the comparison is meaningless"
                    )

    def _note_dtypes(self, base_keys, sources, common) -> None:
        for label, keys, _ in sources:
            differ = [k for k in common if base_keys[k].dtype != keys[k].dtype and keys[k].path.name != ADAPTER_WEIGHTS]
            pairs = Counter((base_keys[k].dtype, keys[k].dtype) for k in differ)
            for (a, b), count in sorted(pairs.items()):
                example = next(k for k in sorted(differ) if (base_keys[k].dtype, keys[k].dtype) == (a, b))
                self.notes.append(
                    f"{label}: {count} tensors are {b} against a {a} base (e.g. {self.exposed(example)}); "
                    f"compared exactly in float64"
                )


def _view(label, keys, common, exposed, loader) -> View:
    entries = {exposed(k): keys[k] for k in sorted(common, key=_sort_key)}
    return View(label, entries, lambda name, entries=entries: loader(entries[name]))
