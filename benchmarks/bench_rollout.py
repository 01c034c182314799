"""Rollout throughput of the training job's two sampling paths, in one run: transformers ``generate`` on
the FSDP2-sharded policy (every generated token all-gathers every layer) against the colocated vLLM
engines (one per rank, external_launcher), and the weight sync the engines need after every step
(gathered from the shards bucket by bucket, cast to the engine dtype, loaded in place).

    python benchmarks/bench_rollout.py             # CPU: 2 ranks (re-launches itself under torchrun), small model
    python benchmarks/bench_rollout.py --gpu       # one GPU: Qwen3-8B layer shapes, a few layers, random weights

Both paths sample the same prompts at temperature 1 with eos honoured; tokens/s counts the completion
tokens actually produced, summed over ranks, over the slowest rank's wall time. The model has random
weights (no hub); on CPU it runs in fp32 (the engine too), on the GPU in bf16 (FSDP2 bf16 mixed
precision over a one-rank group; engine bf16 with sleep mode, whose sleep/wake times are printed too).
Run it in the vLLM environment (.venv-vllm on CPU, envs/vllm-gpu.yaml on the cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _slowest(seconds: float, world_size: int) -> float:
    if world_size == 1:
        return seconds
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _total(value: int, world_size: int) -> int:
    if world_size == 1:
        return value
    t = torch.tensor(value, dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def _timed_rollouts(engine, prompts, max_new: int, device, world_size: int) -> tuple[float, int]:
    """(seconds of the slowest rank, tokens over all ranks) of one sampling pass after a warm-up."""
    engine.sample(prompts[:2], 4, 1.0, seed=0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    out = engine.sample(prompts, max_new, 1.0, seed=1)
    _sync(device)
    return _slowest(time.perf_counter() - t0, world_size), _total(sum(map(len, out.completion_ids)), world_size)


def _build(args, folder: Path, world, tokenizer):
    """A random-weight model of the benchmark's shape, saved once (rank 0) for the engines to start from."""
    import transformers

    from opdgeom.models import save_model
    from opdgeom.train.memory_plan import HUB_SHAPES, meta_model

    if args.gpu:
        shape = dataclasses.replace(HUB_SHAPES["Qwen/Qwen3-8B-Base"], num_hidden_layers=args.layers)
        config = meta_model(shape).config
    else:
        config = transformers.Qwen3Config(
            vocab_size=len(tokenizer), intermediate_size=3 * SMALL["hidden_size"], max_position_embeddings=1024,
            tie_word_embeddings=True, **SMALL,
        )  # fmt: skip
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if world.is_main:
        save_model(model, tokenizer, folder, dtype=torch.bfloat16 if args.gpu else torch.float32)
    if world.size > 1 or dist.is_initialized():
        dist.barrier()
    return model, config


def run(args) -> int:
    from opdgeom.rollout import HFEngine
    from opdgeom.rollout.vllm_engine import VLLMEngine
    from opdgeom.tokenizer import build_char_tokenizer
    from opdgeom.train.distributed import setup, shard

    if args.gpu:
        if not torch.cuda.is_available():
            print("bench_rollout --gpu: no CUDA GPU here; nothing measured")
            return 0
        world = setup(one_rank_group=True)  # FSDP2 over one rank: the many-rank precision path
    else:
        world = setup()
    device = world.device
    tokenizer = build_char_tokenizer()
    folder = Path(args.workdir) / "model"
    model, config = _build(args, folder, world, tokenizer)
    mixed = "bf16" if args.gpu else "fp32"
    model = shard(model, world, mixed_precision=mixed) if dist.is_initialized() else model.to(device)
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor counts its global size

    g = torch.Generator().manual_seed(1 + world.rank)
    vocab = [i for i in range(len(tokenizer)) if i not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    prompts = [
        [vocab[int(j)] for j in torch.randint(0, len(vocab), (args.prompt_len,), generator=g)] for _ in range(args.rows)
    ]

    # transformers generate on the sharded policy (synced: every rank runs the same forward passes).
    hf = HFEngine(model, tokenizer, batch_size=args.rows, synced=world.size > 1)
    hf_s, hf_tokens = _timed_rollouts(hf, prompts, args.max_new, device, world.size)

    # The colocated engine: built from the folder, then synced from the shards as after every step.
    kv_bytes = args.rows * (args.prompt_len + args.max_new) * 2 * config.num_hidden_layers
    kv_bytes *= config.num_key_value_heads * config.head_dim * (2 if args.gpu else 4)
    kv_bytes = max(kv_bytes, 1 << 24)
    t0 = time.perf_counter()
    engine = VLLMEngine(
        folder, dtype="bfloat16" if args.gpu else "float32", max_model_len=args.prompt_len + args.max_new + 8,
        kv_cache_bytes=kv_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
        colocated=world.size > 1, seed=world.rank,
    )  # fmt: skip
    build_s = time.perf_counter() - t0
    syncs = []
    for _ in range(args.syncs):
        if dist.is_initialized():
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        engine.sync_weights(model, bucket_bytes=args.bucket_mb << 20)
        _sync(device)
        syncs.append(_slowest(time.perf_counter() - t0, world.size))
    vllm_s, vllm_tokens = _timed_rollouts(engine, prompts, args.max_new, device, world.size)
    sleep_line = ""
    if engine.sleep_mode:
        t0 = time.perf_counter()
        engine.sleep(level=2)
        sleep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.sync_weights(model, bucket_bytes=args.bucket_mb << 20)  # wake weights, load, wake KV cache
        wake_sync_s = time.perf_counter() - t0
        sleep_line = f"sleep(level=2) {sleep_s:.3f} s, wake + sync + KV realloc {wake_sync_s:.3f} s"

    if world.is_main:
        where = (
            torch.cuda.get_device_name(device)
            if args.gpu
            else f"cpu, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s)/rank"
        )
        layers = config.num_hidden_layers
        print(f"device: {where}; {world.size} rank(s); model: {layers} layers x hidden {config.hidden_size}, "
              f"vocab {config.vocab_size}, {n_params / 1e6:.1f}M parameters, random weights")  # fmt: skip
        print(
            f"rollout: {args.rows} prompts/rank x {args.prompt_len} prompt tokens, up to {args.max_new} new tokens, T=1"
        )
        print(f"{'path':<38} {'tokens':>8} {'seconds':>9} {'tokens/s':>10}")
        print(f"{'generate on the FSDP policy':<38} {hf_tokens:8d} {hf_s:9.2f} {hf_tokens / hf_s:10.0f}")
        print(f"{'colocated vLLM engines':<38} {vllm_tokens:8d} {vllm_s:9.2f} {vllm_tokens / vllm_s:10.0f}")
        print(f"speed-up (tokens/s): {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.1f}x")
        dtype_bytes = 2 if args.gpu else 4
        print(f"weight sync per step: median {statistics.median(syncs):.3f} s over {len(syncs)} "
              f"({n_params * dtype_bytes / 2**30:.2f} GiB in the engine dtype, buckets of {args.bucket_mb} MiB); "
              f"engine start {build_s:.1f} s")  # fmt: skip
        if sleep_line:
            print(sleep_line)
    engine.close()  # vLLM's shutdown also tears down torch.distributed
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="one GPU, Qwen3-8B layer shapes (else CPU, 2 ranks)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers at Qwen3-8B shapes (--gpu)")
    parser.add_argument("--rows", type=int, default=None, help="prompts per rank (default 16 CPU, 256 GPU)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=None, help="new tokens (default 64 CPU, 512 GPU)")
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--nproc", type=int, default=2, help="ranks on CPU (the script re-launches itself)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    args.rows = args.rows or (256 if args.gpu else 16)
    args.max_new = args.max_new or (512 if args.gpu else 64)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.gpu or "WORLD_SIZE" in os.environ:
        if args.workdir is None:
            with tempfile.TemporaryDirectory() as tmp:
                args.workdir = tmp
                return run(args)
        return run(args)
    # CPU: re-launch under torchrun, one process per rank, sharing a work folder.
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, *(argv if argv is not None else sys.argv[1:]), "--workdir", tmp]  # fmt: skip
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
