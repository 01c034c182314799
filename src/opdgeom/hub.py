"""Hub models at pinned revisions, through the shared Hugging Face cache, offline first.

Cluster compute nodes are often offline: a user pre-fills the cache on a login node
(``opdgeom fetch-models --family F``, or ``hf download REPO --revision REV``), points ``HF_HOME`` at
it and sets ``HF_HUB_OFFLINE=1``. A model folder of the study is then made from the cached snapshot
without network: its files are hard-linked from the cache's blobs when both live on one file system
(an 8B/32B pair is not stored twice), copied otherwise. Online, a missing revision is downloaded
into the cache itself (never a private copy), so a rerun or another family reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from opdgeom.io import atomic_dir

# What a causal LM folder needs: weights, config, tokenizer files (no *.bin / *.pth duplicates).
PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class Snapshot:
    """One revision of a hub repo as it lies in the local cache."""

    repo: str
    revision: str  # as pinned in the family preset: a commit hash, a branch or a tag
    commit: str  # the commit the revision resolved to (the snapshot folder's name)
    path: Path


def cache_dir() -> Path:
    """The hub cache this process reads and fills (``HF_HUB_CACHE``, default ``$HF_HOME/hub``)."""
    return Path(constants.HF_HUB_CACHE)


def fetch_command(repo: str, revision: str) -> str:
    return f"hf download {repo} --revision {revision} --include {' '.join(repr(p) for p in PATTERNS)}"


def _offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _missing_files(snapshot: Path) -> list[str]:
    """Files a complete snapshot must have that this one lacks (a partial download leaves these)."""
    missing = [] if (snapshot / "config.json").exists() else ["config.json"]
    index = snapshot / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [s for s in shards if not (snapshot / s).exists()]  # exists() follows the blob link
    elif not list(snapshot.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing


def _cached_path(repo: str, revision: str) -> Path | None:
    """The cache's snapshot folder of the revision (a branch or tag is read through ``refs/``),
    complete or not; None when there is none. Never touches the network."""
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def cached_file(repo: str, revision: str, filename: str) -> Path | None:
    """One file of the revision's cached snapshot (e.g. config.json), or None. No network."""
    path = _cached_path(repo, revision)
    return path / filename if path is not None and (path / filename).exists() else None


def find_snapshot(repo: str, revision: str) -> Snapshot | None:
    """The complete cached snapshot of ``repo`` at ``revision``, or None."""
    path = _cached_path(repo, revision)
    if path is None or _missing_files(path):
        return None
    return Snapshot(repo, revision, path.name, path)


def resolve(repo: str, revision: str) -> Snapshot:
    """The snapshot of ``repo`` at ``revision``: from the cache, else downloaded into it.

    Offline (``HF_HUB_OFFLINE=1``) a revision the cache lacks is an error that names the repo, the
    revision, the cache folder searched and the command that fetches it.
    """
    found = find_snapshot(repo, revision)
    if found is not None:
        return found
    if _offline():
        snapshot = _cached_path(repo, revision)
        detail = f" (the cached snapshot lacks {', '.join(_missing_files(snapshot))})" if snapshot else ""
        raise FileNotFoundError(
            f"{repo}@{revision} is not in the Hugging Face cache {cache_dir()}{detail}, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it. On a machine with network access and the same HF_HOME, run\n"
            f"  HF_HOME={constants.HF_HOME} {fetch_command(repo, revision)}\n"
            f"(or `opdgeom fetch-models --family FAMILY` for every model of a family), then rerun here."
        )
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS))
    except (HfHubHTTPError, OSError) as err:
        raise RuntimeError(
            f"could not download {repo}@{revision} into the Hugging Face cache {cache_dir()}: {err}"
        ) from err
    missing = _missing_files(path)
    if missing:
        raise RuntimeError(f"{repo}@{revision}: the downloaded snapshot {path} lacks {', '.join(missing)}")
    return Snapshot(repo, revision, path.name, path)


def _place(source: Path, dest: Path) -> str:
    """Hard-link ``source`` (a cache blob) to ``dest``; copy when they are on different file systems."""
    try:
        os.link(source, dest)
        return "linked"
    except OSError:
        shutil.copy2(source, dest)
        return "copied"


def materialize(snapshot: Snapshot, out_dir: str | Path) -> Path:
    """Make the study's model folder from a cached snapshot, atomically, and record the commit.

    ``.revision`` holds the commit the snapshot is (read from the cache, not from the network);
    ``.source.json`` says which repo, revision and cache folder it came from.
    """
    out_dir = Path(out_dir)
    modes = set()
    with atomic_dir(out_dir) as tmp:
        for entry in sorted(snapshot.path.rglob("*")):
            if entry.is_dir():
                continue
            dest = tmp / entry.relative_to(snapshot.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            modes.add(_place(entry.resolve(), dest))
        (tmp / ".revision").write_text(snapshot.commit + "\n")
        source = {"repo": snapshot.repo, "revision": snapshot.revision, "commit": snapshot.commit}
        (tmp / ".source.json").write_text(json.dumps({**source, "snapshot": str(snapshot.path)}, indent=2) + "\n")
    how = " and ".join(sorted(modes)) or "nothing to place"
    print(f"{snapshot.repo}@{snapshot.revision} = {snapshot.commit}: {how} from {snapshot.path}", file=sys.stderr)
    return out_dir


def download_model(repo: str, revision: str, out_dir: str | Path) -> Path:
    """Rule ``model`` for a hub model: resolve offline first, then make ``out_dir`` from the cache."""
    return materialize(resolve(repo, revision), out_dir)
