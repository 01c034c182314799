"""Content-addressed statistics cache: hits, corruption, concurrency, housekeeping."""

import multiprocessing as mp
import os
import time

import torch

from opdgeom.geometry import cache as cache_mod
from opdgeom.geometry.cache import StatCache, tensor_digest


def test_digest_depends_on_bytes_dtype_and_shape():
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(w) == tensor_digest(w.clone())
    assert tensor_digest(w) == tensor_digest(w.t().contiguous().t())  # layout does not matter, values do
    assert tensor_digest(w) != tensor_digest(w.reshape(4, 3))
    assert tensor_digest(w) != tensor_digest(w.to(torch.float64))
    bumped = w.clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(100.0))
    assert tensor_digest(w) != tensor_digest(bumped)
    assert tensor_digest(w.to(torch.bfloat16)) != tensor_digest(w.to(torch.float16))


def test_digest_chunks_agree(monkeypatch):
    w = torch.randn(1000, dtype=torch.float64)
    whole = tensor_digest(w)
    monkeypatch.setattr(cache_mod, "HASH_CHUNK_BYTES", 100)
    assert tensor_digest(w) == whole


def test_hit_miss_and_key_parts(tmp_path):
    cache = StatCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"sigma_r": torch.tensor([3.0, 1.0], dtype=torch.float64), "x": torch.ones(2, 2)}

    first = cache.get_or_compute(["abc"], "spectrum", {"k": 2}, compute)
    second = cache.get_or_compute(["abc"], "spectrum", {"k": 2}, compute)
    assert len(calls) == 1 and cache.hits == 1 and cache.misses == 1
    assert torch.equal(first["sigma_r"], second["sigma_r"]) and second["sigma_r"].dtype == torch.float64
    keys = {
        StatCache.key(["abc"], "spectrum", {"k": 2}),
        StatCache.key(["abc"], "spectrum", {"k": 3}),
        StatCache.key(["abd"], "spectrum", {"k": 2}),
        StatCache.key(["abc"], "other", {"k": 2}),
        StatCache.key(["abc", "def"], "spectrum", {"k": 2}),
        StatCache.key(["def", "abc"], "spectrum", {"k": 2}),
    }
    assert len(keys) == 6
    assert cache.info()["entries"] == 1


def test_code_version_is_part_of_the_key(monkeypatch):
    before = StatCache.key(["abc"], "spectrum", {"k": 2})
    monkeypatch.setattr(cache_mod, "CODE_VERSION", "something-else")
    assert StatCache.key(["abc"], "spectrum", {"k": 2}) != before


def test_corrupt_entries_are_detected_and_recomputed(tmp_path):
    cache = StatCache(tmp_path)
    key = StatCache.key(["abc"], "spectrum", None)
    stats = {"v": torch.arange(100, dtype=torch.float64)}
    cache.put(key, stats)
    path = cache.path(key)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF  # flip bits inside the payload
    path.write_bytes(bytes(blob))
    assert cache.get(key) is None and not path.exists()
    cache.put(key, stats)
    path.write_bytes(path.read_bytes()[:-20])  # truncated by a crash or a full disk
    assert cache.get(key) is None
    recomputed = cache.get_or_compute(["abc"], "spectrum", None, lambda: stats)
    assert torch.equal(recomputed["v"], stats["v"]) and torch.equal(cache.get(key)["v"], stats["v"])


def test_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDGEOM_CACHE", str(tmp_path / "envcache"))
    cache = StatCache()
    cache.put("ab" * 32, {"x": torch.zeros(1)})
    assert (tmp_path / "envcache").is_dir()
    assert cache_mod.info()["entries"] == 1


def _writer(root, worker, rounds, queue):
    cache = StatCache(root)
    bad = 0
    for i in range(rounds):
        key = StatCache.key([f"t{i % 5}"], "spectrum", None)
        value = torch.full((20_000,), float(i % 5), dtype=torch.float64)
        got = cache.get_or_compute([f"t{i % 5}"], "spectrum", None, lambda v=value: {"v": v})
        if not torch.equal(got["v"], value):
            bad += 1
        cache.put(key, {"v": value})
    queue.put((worker, bad))


def test_concurrent_writers_never_expose_partial_entries(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(bad == 0 for _, bad in results)
    cache = StatCache(tmp_path)
    assert cache.info()["entries"] == 5
    assert not list(tmp_path.glob("*/.*.tmp"))  # every temp file was renamed into place


def test_gc_by_age_and_size(tmp_path):
    cache = StatCache(tmp_path)
    keys = [StatCache.key([str(i)], "s", None) for i in range(4)]
    for i, key in enumerate(keys):
        cache.put(key, {"x": torch.zeros(1000)})
        stamp = time.time() - (10 - i) * 86400  # key 0 is oldest
        os.utime(cache.path(key), (stamp, stamp))
    assert cache.gc(max_age_days=8.5) == 2  # the 10 and 9 days old ones
    size = cache.info()["bytes"]
    assert cache.get(keys[3]) is not None  # touching makes key 3 most recently used
    assert cache.gc(max_bytes=size // 2 + 1) == 1
    assert cache.get(keys[2]) is None and cache.get(keys[3]) is not None
    assert cache_mod.gc(tmp_path, max_bytes=0) == 1
    assert cache.info()["entries"] == 0
