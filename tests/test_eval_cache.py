"""The content-addressed store of held-out results: keys follow content, hits are exact, misses recompute."""

import dataclasses
import shutil

import pytest

import opdgeom.evaluate as evaluate
from opdgeom.eval_cache import EvalCache, path_digest


@pytest.fixture
def checkpoints(tiny, tmp_path):
    """The tiny init as two checkpoints: step 0 (the init itself) and a copy in another folder."""
    copy = tmp_path / "run" / "step_000010"
    shutil.copytree(tiny["init"], copy)
    return [{"step": 0, "path": str(tiny["init"])}, {"step": 10, "path": str(copy), "tokens": 5}]


def test_path_digest_follows_content_not_location(tiny, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny["init"], folder)
    assert path_digest(folder) == path_digest(tiny["init"])
    linked = tmp_path / "linked"  # a Hugging Face snapshot: symlinks to blobs
    linked.mkdir()
    for file in tiny["init"].iterdir():
        (linked / file.name).symlink_to(file)
    assert path_digest(linked) == path_digest(tiny["init"])
    config = folder / "config.json"
    config.write_text(config.read_text().replace("32", "33", 1))
    assert path_digest(folder) != path_digest(tiny["init"])
    (folder / "config.json").rename(folder / "other.json")
    assert path_digest(folder) != path_digest(tiny["init"])
    with pytest.raises(FileNotFoundError, match="missing"):
        path_digest(tmp_path / "missing")


def test_entries_round_trip_exactly_and_corrupt_ones_are_recomputed(tmp_path):
    store = EvalCache(tmp_path)
    key = store.key("abc", {"samples": 4})
    assert key != store.key("abc", {"samples": 2}) and key != store.key("abd", {"samples": 4})
    result = {"accuracy": 1 / 3, "nll": 0.1 + 0.2, "correct": [1, 0, 1], "reward_per_prompt": [0.25, 1e-300]}
    assert store.get(key) is None
    store.put(key, result)
    assert store.get(key) == result  # floats round-trip bit for bit
    path = store.path(key)
    path.write_bytes(path.read_bytes()[:-3])  # truncated by a dying writer
    assert store.get(key) is None and not path.exists()


def test_evaluation_reuses_a_checkpoint_with_the_same_content_and_settings(tiny, checkpoints, tmp_path, monkeypatch):
    examples = tiny["data"]
    settings = evaluate.EvalSettings(max_new_tokens=6, batch_size=8, samples=2)
    kwargs = dict(settings=settings, teacher=tiny["teacher"])
    uncached = evaluate.evaluate_checkpoints("run", checkpoints, examples, "math", **kwargs)
    calls = []
    real = evaluate.checkpoint_metrics
    monkeypatch.setattr(evaluate, "checkpoint_metrics", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    cache = tmp_path / "cache"
    first = evaluate.evaluate_checkpoints("run", checkpoints, examples, "math", cache=cache, **kwargs)
    # the copy at step 10 has the init's content: evaluated once, read back once
    assert calls == [checkpoints[0]["path"]]
    assert first.equals(uncached)
    second = evaluate.evaluate_checkpoints("other", checkpoints[::-1], examples, "math", cache=cache, **kwargs)
    assert len(calls) == 1
    assert second.drop("ref", "step", "tokens").equals(uncached.drop("ref", "step", "tokens").reverse())
    # another setting or another teacher is another entry
    evaluate.evaluate_checkpoints(
        "run",
        checkpoints[:1],
        examples,
        "math",
        cache=cache,
        **{**kwargs, "settings": dataclasses.replace(settings, samples=1)},
    )
    evaluate.evaluate_checkpoints(
        "run", checkpoints[:1], examples, "math", cache=cache, **{**kwargs, "teacher": checkpoints[1]["path"]}
    )
    assert len(calls) == 3
