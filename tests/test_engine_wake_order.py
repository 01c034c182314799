"""The order in which a colocated engine takes memory back from the trainer (issue 27, defect 4).

After the optimizer update the GPU holds the trainer's freed blocks in torch's allocator cache, which
a waking vLLM engine cannot see. TRL's colocate mode and verl's sharding manager therefore: empty the
cache, wake the weights, load the new ones, empty the cache again (the gather buckets are gone), and
only then map the KV cache, the largest allocation. This test drives the real VLLMEngine and
ColocatedRollout over a recording stand-in for vLLM's LLM (a GPU's memory cannot be had on CPU, and
the CPU build has no sleep mode) and checks that order through two on-policy steps.

Runs under .venv-vllm (the wrapper module imports vLLM); elsewhere it is skipped.
"""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here: run under .venv-vllm (scripts/vllm_env.sh)")

import torch  # noqa: E402

from opdgeom.rollout import vllm_engine  # noqa: E402
from opdgeom.rollout.colocate import ColocatedRollout, behaviour_version  # noqa: E402

pytestmark = pytest.mark.vllm


class RecordingLLM:
    """What VLLMEngine calls on vLLM's LLM, written to ``calls`` in order; weights are consumed as the
    real loader consumes them (one bucket at a time), each gathered tensor recorded as "load"."""

    def __init__(self, calls: list[str]):
        self.calls = calls

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags=None) -> None:
        self.calls.append("wake " + ("all" if tags is None else "+".join(tags)))

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        assert method == "reload_weights"
        for _name, _tensor in kwargs["weights_iterator"]:
            self.calls.append("load")

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset prefix cache")

    def generate(self, prompts, params, use_tqdm: bool):
        self.calls.append("generate")
        sample = SimpleNamespace(token_ids=[7], logprobs=[{7: SimpleNamespace(logprob=-0.5)}])
        return [SimpleNamespace(outputs=[sample]) for _ in prompts]


def recording_engine(calls: list[str]) -> vllm_engine.VLLMEngine:
    """The real wrapper with sleep mode on (as on a GPU), its LLM replaced by the recorder."""
    engine = vllm_engine.VLLMEngine.__new__(vllm_engine.VLLMEngine)
    engine.llm, engine.sleep_mode, engine.asleep_level = RecordingLLM(calls), True, None
    engine.eos_token_id, engine.dtype, engine.last_sync_s, engine.syncs = 0, torch.float32, 0.0, 0
    return engine


def test_waking_after_the_update_empties_the_cache_and_maps_weights_before_the_kv_cache(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(vllm_engine, "free_cached_memory", lambda: calls.append("empty cache"))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # an in-process engine, as VLLMEngine sets it
    policy = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))  # 4 parameters
    rollout = ColocatedRollout(recording_engine(calls), bucket_bytes=1)  # one tensor per bucket
    on_policy = SimpleNamespace(on_policy=True)
    steps = []
    for step in range(2):
        calls.clear()
        assert rollout.prepare(policy, behaviour_version(on_policy, step))
        rollout.sample([[1, 2]], max_new_tokens=1, temperature=1.0, seed=step)
        rollout.release()
        steps.append(list(calls))
    loads = ["load"] * 4
    # Step 0: the engine starts awake (built from the init folder), so the sync only loads.
    assert steps[0] == [*loads, "reset prefix cache", "generate", "sleep 2"]
    # Step 1: asleep at level 2 since the update; nothing is mapped before the cache is emptied, and
    # the KV cache only after the weights are loaded and the cache emptied again.
    assert steps[1] == [
        "empty cache", "wake weights", *loads, "empty cache", "wake kv_cache", "reset prefix cache",
        "generate", "sleep 2",
    ]  # fmt: skip


def test_an_engine_that_keeps_its_weights_wakes_whole_after_emptying_the_cache(monkeypatch):
    """A frozen (anchor) sampler is never synced: it wakes from level 1 in one call, cache emptied first."""
    calls: list[str] = []
    monkeypatch.setattr(vllm_engine, "free_cached_memory", lambda: calls.append("empty cache"))
    rollout = ColocatedRollout(recording_engine(calls))
    frozen = SimpleNamespace(on_policy=False)
    for step in range(2):
        assert not rollout.prepare(None, behaviour_version(frozen, step))
        rollout.sample([[1, 2]], max_new_tokens=1, temperature=1.0, seed=step)
        rollout.release()
    assert calls == ["generate", "sleep 1", "empty cache", "wake all", "generate", "sleep 1"]
