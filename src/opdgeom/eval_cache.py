"""Content-addressed store of per-checkpoint held-out results.

Every run that starts from another run's checkpoint evaluates those same weights again at its step 0:
in the tiny study 14 runs start from ``sft.s0``'s last checkpoint, and on the cluster each of them is
an 8B evaluation with a 32B teacher. An entry is keyed by the BLAKE3 digests of the checkpoint folder,
the held-out data file and the teacher folder, and by every setting that changes the result (device
type included), so a hit is the row the evaluation would have computed on this kind of device.

Entries are JSON (Python floats round-trip exactly) behind a blake2b checksum, written to a temporary
name and renamed into place: concurrent jobs never read half an entry (both may compute it; the last
rename wins with the same content), and a corrupt entry is removed and recomputed. They live under
``<cache>/eval/`` beside the tensor statistics; they are a few kB each and ``opdgeom cache gc`` (which
collects tensor statistics) leaves them alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3

from opdgeom.io import write_bytes

# Bump whenever an evaluation metric's definition or numerics change: old entries stop matching.
CODE_VERSION = "opdgeom-eval-2"
SUBDIR = "eval"
_CHUNK_BYTES = 1 << 24


def path_digest(path: str | Path) -> str:
    """BLAKE3 of a file's bytes, or of a folder's files (relative names and bytes, sorted by name,
    symlinks followed: a Hugging Face snapshot links to its blobs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot hash {path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for file in files:
        hasher.update(f"{file.relative_to(path) if file != path else file.name}|{file.stat().st_size}|".encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                hasher.update(chunk)
    return hasher.hexdigest()


class EvalCache:
    """A folder of evaluation results addressed by content; safe for concurrent processes."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / SUBDIR
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(checkpoint_digest: str, settings: dict) -> str:
        spec = json.dumps({"checkpoint": checkpoint_digest, "settings": settings, "code": CODE_VERSION}, sort_keys=True)
        return hashlib.blake2b(spec.encode(), digest_size=32).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored result, or None when absent or corrupt (a corrupt entry is removed)."""
        path = self.path(key)
        try:
            checksum, _, payload = path.read_bytes().partition(b"\n")
        except FileNotFoundError:
            self.misses += 1
            return None
        if checksum.decode(errors="replace") != hashlib.blake2b(payload, digest_size=32).hexdigest():
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(payload)

    def put(self, key: str, result: dict) -> None:
        payload = json.dumps(result).encode()  # key order kept: it is the table's column order
        write_bytes(
            hashlib.blake2b(payload, digest_size=32).hexdigest().encode() + b"\n" + payload, self.path(key), fsync=True
        )
