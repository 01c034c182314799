"""Content-addressed store of tensor statistics (spectra, singular vectors).

Every checkpoint of a study shares tensors with others (the anchor W0 appears in every
comparison, and runs from one anchor share it across methods), and the float64 Gram
eigendecomposition of one Qwen3-8B matrix costs seconds, so statistics are stored under
a key made of the content hashes of the input tensors, the statistic name, its
parameters and CODE_VERSION. Snakemake's own cache keys on how a file was made, not on
content, so it cannot do this.

Entries are safetensors payloads behind a magic tag and a blake2b checksum. They are
written to a unique temporary name and renamed into place, so concurrent processes never
see a half-written entry (both may compute the same statistic; the last rename wins
with identical content). A corrupt or truncated entry fails its checksum, is deleted and
recomputed. Location: the ``root`` argument, else $OPDGEOM_CACHE, else
~/.cache/opdgeom/geometry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3
import torch
from safetensors.torch import load as load_payload
from safetensors.torch import save as save_payload

from opdgeom.io import write_bytes

# Bump whenever a cached statistic's definition or numerics change: old entries stop matching.
CODE_VERSION = "opdgeom-geometry-2"
ENV_VAR = "OPDGEOM_CACHE"
MAGIC = b"OPDGSTAT1\n"
DIGEST_BYTES = 32
HASH_CHUNK_BYTES = 1 << 24
SUFFIX = ".stat"


def tensor_digest(tensor: torch.Tensor) -> str:
    """BLAKE3 of dtype, shape and raw bytes (streamed in 16 MB chunks), as hex.

    BLAKE3 hashed 3.6-6 GB/s here (blake2b: 0.8 GB/s), so a cache lookup costs milliseconds
    per matrix against the seconds of linear algebra a hit saves.
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    for start in range(0, len(raw), HASH_CHUNK_BYTES):
        hasher.update(raw[start : start + HASH_CHUNK_BYTES])
    return hasher.hexdigest()


def default_root() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "opdgeom" / "geometry"


class StatCache:
    """A directory of statistic entries addressed by content; safe for concurrent processes."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(digests: Sequence[str], statistic: str, params: dict | None = None) -> str:
        """Key of one statistic of the tensors with these content digests (order matters)."""
        spec = json.dumps(
            {"inputs": list(digests), "statistic": statistic, "params": params or {}, "code": CODE_VERSION},
            sort_keys=True,
        )
        return hashlib.blake2b(spec.encode(), digest_size=DIGEST_BYTES).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored statistics, or None when absent or corrupt (a corrupt entry is removed)."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        head = len(MAGIC) + DIGEST_BYTES
        payload = blob[head:]
        valid = (
            blob[: len(MAGIC)] == MAGIC
            and blob[len(MAGIC) : head] == hashlib.blake2b(payload, digest_size=DIGEST_BYTES).digest()
        )
        stats = None
        if valid:
            try:
                stats = load_payload(payload)
            except Exception:  # a checksummed payload that does not parse: treat as corrupt
                stats = None
        if stats is None:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used entries survive gc(max_bytes)
        except OSError:
            pass
        return stats

    def put(self, key: str, stats: dict[str, torch.Tensor]) -> None:
        """Write atomically (temp file in the same folder, fsync, rename)."""
        payload = save_payload({name: t.detach().cpu().contiguous() for name, t in stats.items()})
        blob = MAGIC + hashlib.blake2b(payload, digest_size=DIGEST_BYTES).digest() + payload
        write_bytes(blob, self.path(key), fsync=True)

    def get_or_compute(
        self,
        digests: Sequence[str],
        statistic: str,
        params: dict | None,
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        key = self.key(digests, statistic, params)
        stats = self.get(key)
        if stats is not None:
            self.hits += 1
            return stats
        self.misses += 1
        stats = compute()
        self.put(key, stats)
        return stats

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        entries = []
        if self.root.is_dir():
            for path in self.root.glob(f"*/*{SUFFIX}"):
                try:
                    entries.append((path, path.stat()))
                except FileNotFoundError:  # removed by a concurrent gc
                    continue
        return entries

    def info(self) -> dict:
        """Entry count, total bytes, location, and this process's hit/miss counts."""
        entries = self._entries()
        return {
            "root": str(self.root),
            "entries": len(entries),
            "bytes": sum(st.st_size for _, st in entries),
            "hits": self.hits,
            "misses": self.misses,
        }

    def gc(self, max_age_days: float | None = None, max_bytes: int | None = None) -> int:
        """Remove entries unused for max_age_days, then least recently used ones until under max_bytes.

        Also removes temp files older than a day (left by killed writers). Returns entries removed.
        """
        now = time.time()
        removed = 0
        entries = sorted(self._entries(), key=lambda e: e[1].st_mtime)
        if max_age_days is not None:
            cutoff = now - max_age_days * 86400
            old = [e for e in entries if e[1].st_mtime < cutoff]
            for path, _ in old:
                path.unlink(missing_ok=True)
            removed += len(old)
            entries = [e for e in entries if e[1].st_mtime >= cutoff]
        if max_bytes is not None:
            total = sum(st.st_size for _, st in entries)
            for path, st in entries:
                if total <= max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= st.st_size
                removed += 1
        for tmp in self.root.glob("*/.*.tmp") if self.root.is_dir() else []:
            try:
                if tmp.stat().st_mtime < now - 86400:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        return removed


def info(root: str | Path | None = None) -> dict:
    """Summary of the cache at ``root`` (default: $OPDGEOM_CACHE or ~/.cache/opdgeom/geometry)."""
    return StatCache(root).info()


def gc(root: str | Path | None = None, max_age_days: float | None = None, max_bytes: int | None = None) -> int:
    """Garbage-collect the cache at ``root``; see StatCache.gc."""
    return StatCache(root).gc(max_age_days=max_age_days, max_bytes=max_bytes)
