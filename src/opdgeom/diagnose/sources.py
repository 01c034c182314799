"""What the user points at: a base model (folder or hub id in the local HF cache) and runs of checkpoints.

A RUN argument is ``[NAME=]PATH`` or ``[NAME=]PATH,PATH,...`` (an explicit list of HF folders). A run
folder's layout is detected from what it holds:

- ``opdgeom``: this project's run folder (``manifest.json``; step 0, the init, is the base itself);
- ``trl``: TRL / transformers ``checkpoint-N/`` folders (full models, or PEFT adapters: ``trl+peft``);
- ``verl``: ``global_step_N/actor/huggingface/`` (weights merged from verl's FSDP shards);
- ``peft``: adapter folders (``adapter_config.json``) named with their step, or one adapter folder;
- ``hf-folder``: one HF model folder (a single checkpoint);
- ``hf-list``: folders listed explicitly; a step is the number in each folder's name when every
  name has a different one, else the position in the list (1, 2, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from opdgeom.geometry.stream import INDEX_FILE, SINGLE_FILE

ADAPTER_CONFIG = "adapter_config.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?$")
TRL_DIR = re.compile(r"^checkpoint-(\d+)$")
VERL_DIR = re.compile(r"^global_step_(\d+)$")
NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last number in a name


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: a full HF model folder, or a PEFT adapter applied to the base."""

    step: int
    path: Path
    adapter: bool = False


@dataclass
class Run:
    name: str
    layout: str
    source: str
    checkpoints: list[Checkpoint]
    notes: list[str] = field(default_factory=list)


def has_weights(folder: Path) -> bool:
    return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def resolve_model(spec: str, allow_download: bool = False) -> tuple[Path, str]:
    """(folder, how it was found) of a model given as a folder or a hub id ``org/name[@revision]``.

    Hub ids resolve through the local Hugging Face cache ($HF_HUB_CACHE / $HF_HOME) only; a download
    happens only with ``allow_download`` (into that cache, never a separate copy).
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a model folder")
        return path, f"folder {path}"
    if not HUB_ID.match(spec):
        raise FileNotFoundError(f"{spec}: no such folder (and not a hub id org/name[@revision])")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    revision = revision or None
    patterns = ["*.json", "*.safetensors"]
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns)
        how = "local HF cache"
    except LocalEntryNotFoundError as exc:
        if not allow_download:
            raise FileNotFoundError(
                f"{spec}: not a folder, and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
                f"fetch it with `hf download {repo_id}` or pass --allow-download"
            ) from exc
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        how = "downloaded into the HF cache"
    return Path(folder), f"hub {spec} ({how}: {folder})"


def _numbered(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    found = []
    for child in folder.iterdir():
        match = pattern.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _full_or_adapter(folder: Path, step: int, layout: str) -> Checkpoint:
    if has_weights(folder):
        return Checkpoint(step, folder)
    if is_adapter(folder):
        return Checkpoint(step, folder, adapter=True)
    hint = ""
    if layout == "verl":
        hint = (
            "; verl saves FSDP shards: merge them first "
            "(python -m verl.model_merger merge --backend fsdp --local_dir <actor> --target_dir <actor>/huggingface)"
        )
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or {ADAPTER_CONFIG}{hint}")


def _manifest_run(folder: Path) -> tuple[str, list[Checkpoint], list[str]]:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        records = manifest["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest_path}: unreadable run manifest ({exc})") from exc
    name = manifest.get("run", {}).get("name", folder.name)
    checkpoints, notes = [], []
    for record in records:
        path = Path(record["path"])
        path = path if path.is_absolute() else folder / path
        if int(record["step"]) == 0:
            notes.append(f"step 0 ({path}) is the run's init: the trajectory starts at BASE instead")
            continue
        checkpoints.append(_full_or_adapter(path, int(record["step"]), "opdgeom"))
    return name, checkpoints, notes


def _explicit_steps(folders: list[Path]) -> list[int]:
    numbers = [NUMBER.search(f.name) for f in folders]
    steps = [int(m.group(1)) if m else None for m in numbers]
    if None not in steps and len(set(steps)) == len(steps):
        return steps
    return list(range(1, len(folders) + 1))


def detect_run(arg: str, allow_download: bool = False) -> Run:
    """The run a RUN argument names (see the module docstring), checkpoints sorted by step."""
    name, sep, spec = arg.partition("=")
    if not sep or "/" in name or not name:
        name, spec = "", arg
    items = [s for s in spec.split(",") if s]
    if not items:
        raise ValueError(f"run {arg!r}: no folder given")
    if len(items) > 1:
        folders = [resolve_model(item, allow_download)[0] for item in items]
        steps = _explicit_steps(folders)
        checkpoints = [_full_or_adapter(f, s, "hf-list") for s, f in sorted(zip(steps, folders))]
        if len(set(steps)) != len(steps):
            raise ValueError(f"run {arg!r}: two folders have the same step")
        return Run(name or "run", "hf-list", spec, checkpoints)
    folder = Path(items[0]).expanduser()
    if not folder.is_dir():
        folder = resolve_model(items[0], allow_download)[0]
    notes: list[str] = []
    if (folder / "manifest.json").is_file():
        layout = "opdgeom"
        run_name, checkpoints, notes = _manifest_run(folder)
        name = name or run_name
    elif trl := _numbered(folder, TRL_DIR):
        checkpoints = [_full_or_adapter(path, step, "trl") for step, path in trl]
        layout = "trl+peft" if any(c.adapter for c in checkpoints) else "trl"
    elif verl := _numbered(folder, VERL_DIR):
        checkpoints = [_full_or_adapter(path / "actor" / "huggingface", step, "verl") for step, path in verl]
        layout = "verl"
    elif has_weights(folder) or is_adapter(folder):
        checkpoints = [_full_or_adapter(folder, 1, "hf-folder")]
        layout = "peft" if checkpoints[0].adapter else "hf-folder"
    else:
        adapters = [c for c in sorted(folder.iterdir()) if c.is_dir() and is_adapter(c)]
        if not adapters:
            raise FileNotFoundError(
                f"{folder}: no checkpoints found (expected manifest.json, checkpoint-N/, "
                f"global_step_N/actor/huggingface/, adapter folders, or HF weights)"
            )
        steps = _explicit_steps(adapters)
        checkpoints = [Checkpoint(s, f, adapter=True) for s, f in sorted(zip(steps, adapters))]
        layout = "peft"
    if not checkpoints:
        raise ValueError(f"{folder}: the run has no checkpoint after step 0")
    return Run(name or folder.resolve().name, layout, str(folder), checkpoints, notes)
