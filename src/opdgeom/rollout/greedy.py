"""Greedy completions of a saved checkpoint for evaluation, on transformers or on vLLM.

``evaluate`` calls this per checkpoint: the same prompts, greedy decoding, eos included when the model
stopped, so the verifier sees the same kind of completions from either engine. vLLM is for the hub
families (an engine per checkpoint: a few seconds to start, then thousands of tokens/s on a GPU);
transformers ``generate`` stays the default and what the tiny families use.
"""

from __future__ import annotations

from pathlib import Path

ENGINES = ("hf", "vllm")
# Tokens one engine step schedules (vLLM's max_num_batched_tokens), set rather than left to vLLM's
# per-GPU default so that the evaluate memory plan (train/eval_plan.py) counts the step it runs.
ENGINE_BATCH_TOKENS = 8192


def greedy_completions(
    model_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    engine: str = "hf",
    batch_size: int = 256,
    kv_cache_bytes: int | None = None,
) -> list[list[int]]:
    """Completion token ids of every prompt (token ids, as ``encode_prompt`` makes them) under greedy
    decoding. ``engine="vllm"`` needs the vLLM environment; its engine runs bf16 on a GPU and fp32 on
    CPU, and is shut down before returning (one checkpoint after another in one process).
    ``kv_cache_bytes`` (vLLM): None sizes it from ``batch_size`` concurrent sequences."""
    if engine not in ENGINES:
        raise ValueError(f"evaluation engine must be one of {ENGINES}, got {engine!r}")
    if engine == "hf":
        from opdgeom.device import local_device
        from opdgeom.models import load_model, load_tokenizer
        from opdgeom.rollout.hf import HFEngine

        model = load_model(Path(model_dir), device=local_device()).eval()
        sampler = HFEngine(model, load_tokenizer(model_dir), batch_size=batch_size)
        return sampler.sample(prompts, max_new_tokens, 0.0, seed=0).completion_ids
    return engine_completions(model_dir, [(prompts, 0.0, 0, 1.0)], max_new_tokens, batch_size, kv_cache_bytes)[0]


def engine_completions(
    model_dir: str | Path,
    requests: list[tuple],
    max_new_tokens: int,
    batch_size: int = 256,
    kv_cache_bytes: int | None = None,
) -> list[list[list[int]]]:
    """The completions of each (prompts, temperature, seed, top_p) request (temperature 0: greedy) on
    one vLLM engine, shut down before returning, so the evaluation's later phases find the GPU free.

    The engine's memory is explicit, never "90% of the GPU": its weights plus ``kv_cache_bytes`` of KV
    cache (None: ``batch_size`` concurrent sequences of the longest prompt + ``max_new_tokens``, at
    least one whole ``max_model_len`` sequence as vLLM requires)."""
    import torch
    import transformers

    from opdgeom.rollout.colocate import check_vllm_build, kv_bytes_per_token

    check_vllm_build()
    from opdgeom.device import free_cached_memory
    from opdgeom.rollout.vllm_engine import VLLMEngine

    model_dir = Path(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    on_gpu = torch.cuda.is_available()
    longest = max(len(p) for prompts, *_ in requests for p in prompts) + max_new_tokens
    max_model_len = min(config.max_position_embeddings, longest + 8)
    if kv_cache_bytes is None:
        sequences = min(batch_size, max(len(prompts) for prompts, *_ in requests))
        kv_cache_bytes = max(sequences * longest, max_model_len) * kv_bytes_per_token(config, 2 if on_gpu else 4)
    vllm = VLLMEngine(
        model_dir, dtype="bfloat16" if on_gpu else "float32", max_model_len=max_model_len,
        kv_cache_bytes=kv_cache_bytes, sleep_mode=False, max_num_batched_tokens=max(ENGINE_BATCH_TOKENS, max_model_len),
    )  # fmt: skip
    try:
        return [
            vllm.sample(prompts, max_new_tokens, temp, seed=seed, top_p=top_p).completion_ids
            for prompts, temp, seed, top_p in requests
        ]
    finally:
        vllm.close()
        del vllm
        free_cached_memory()
