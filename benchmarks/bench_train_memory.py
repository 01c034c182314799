"""OPD training steps at Qwen3-8B's layer shapes on one GPU: tokens/s per phase and peak memory next to
the memory plan's prediction for the same shapes.

The student has Qwen3-8B's layers (hidden 4096, MLP 12288, 32 query / 8 KV heads, vocab 151,936) and the
teacher Qwen3-32B's, a few layers each, random weights built from the config (no hub). Both run the
training code's sharding path: FSDP2 over a one-rank group with the bf16 mixed-precision policy and
per-layer activation checkpointing (``distributed.shard``), the teacher bf16 sharded (``shard_frozen``),
log-probs chunked over positions (``opdgeom.logprobs.token_logprobs``). Rollouts are random tokens (the
rollout engine is benchmarked elsewhere), so the plan is taken without its rollout components.

    python benchmarks/bench_train_memory.py              # on a GPU (scripts/gpu_check.sh runs this)
    python benchmarks/bench_train_memory.py --cpu-smoke  # tiny shapes on CPU: the code path only
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import torch.distributed as dist

from opdgeom.logprobs import token_logprobs
from opdgeom.train.distributed import World, shard, shard_frozen
from opdgeom.train.memory_plan import GB, HUB_SHAPES, ModelShape, meta_model, plan_shapes
from opdgeom.train.objectives import opd_advantages, pg_loss

TINY = ModelShape("qwen3", 64, 2, 2, 1, 32, 128, 512, False)


def _model(shape: ModelShape, device: torch.device, seed: int):
    import transformers

    config = meta_model(shape).config  # the same config the memory plan counts
    torch.manual_seed(seed)
    with torch.device(device):  # random init straight on the device: no host copy of the model
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _phase(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def _done(device: torch.device, t0: float) -> tuple[float, float | None]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / GB
    return time.perf_counter() - t0, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="student decoder layers (Qwen3-8B shapes)")
    parser.add_argument("--teacher-layers", type=int, default=2, help="teacher decoder layers (Qwen3-32B shapes)")
    parser.add_argument("--rows", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="log-prob chunk (positions)")
    parser.add_argument("--steps", type=int, default=3, help="steps (the first one is warm-up)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory the plan is checked against")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (tests the path only)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        student_shape = teacher_shape = TINY
        args.rows, args.seq_len, args.chunk_tokens = 2, 16, 8
    elif not torch.cuda.is_available():
        print("bench_train_memory: no CUDA GPU here; nothing measured (use --cpu-smoke to test the code path)")
        return 0
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        student_shape = dataclasses.replace(HUB_SHAPES["Qwen/Qwen3-8B-Base"], num_hidden_layers=args.layers)
        teacher_shape = dataclasses.replace(HUB_SHAPES["Qwen/Qwen3-32B"], num_hidden_layers=args.teacher_layers)

    # A one-rank group: FSDP2 (and so the mixed-precision policy) runs exactly as on many ranks.
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = World(rank=0, size=1, device=device)
    student = shard(_model(student_shape, device, 0), world, mixed_precision="bf16", activation_checkpointing=True)
    teacher = shard_frozen(_model(teacher_shape, device, 1), world)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.95))
    resident = torch.cuda.memory_allocated() / GB if device.type == "cuda" else None

    tokens = args.rows * args.seq_len
    predicted = plan_shapes(
        "bench", ("student", student_shape), ("teacher", teacher_shape), 1, args.gpu_mem_gb,
        {"batch_size": args.rows, "group_size": 1, "max_new_tokens": args.seq_len},
        micro_batch_tokens=tokens, chunk_tokens=args.chunk_tokens, rollout_engine=False, frozen_copies=0,
        mixed_precision="bf16",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    student.train()
    rows: list[dict] = []
    for step in range(args.steps):
        ids_BT = torch.randint(0, student_shape.vocab_size, (args.rows, args.seq_len), generator=g).to(device)
        mask_BT = torch.ones_like(ids_BT)
        t0 = _phase(device)
        with torch.no_grad():
            teacher_logp_BT = token_logprobs(teacher, ids_BT, mask_BT, chunk_tokens=args.chunk_tokens)
        score_s, score_peak = _done(device, t0)
        t0 = _phase(device)
        logp_BT = token_logprobs(student, ids_BT, mask_BT, chunk_tokens=args.chunk_tokens)
        advantages_BT = opd_advantages(logp_BT.detach(), teacher_logp_BT)
        loss = pg_loss(logp_BT, logp_BT.detach(), advantages_BT, torch.ones_like(logp_BT))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_s, update_peak = _done(device, t0)
        rows.append({"score_s": score_s, "score_peak": score_peak, "update_s": update_s, "update_peak": update_peak})
        if not torch.isfinite(loss):
            print(f"bench_train_memory: step {step}: loss is {loss.item()}", file=sys.stderr)
            return 1

    timed = rows[1:] or rows  # the first step compiles kernels and allocates the optimizer state
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in ("score_s", "update_s")}
    peak = {k: None if rows[0][k] is None else max(r[k] for r in rows) for k in ("score_peak", "update_peak")}

    def gb(value):
        return "n/a (CPU)" if value is None else f"{value:.2f} GB"

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (smoke shapes)'}")
    print(f"student {student_shape.num_hidden_layers} layers x hidden {student_shape.hidden_size}, teacher "
          f"{teacher_shape.num_hidden_layers} layers x hidden {teacher_shape.hidden_size}, {args.rows} x "
          f"{args.seq_len} tokens/step, chunk {args.chunk_tokens}; resident after setup {gb(resident)}")  # fmt: skip
    print(f"{'phase':<8} {'tokens/s':>10} {'peak measured':>16} {'plan':>10}")
    for phase, key in (("score", "score"), ("update", "update")):
        print(
            f"{phase:<8} {tokens / mean[f'{key}_s']:10.0f} {gb(peak[f'{key}_peak']):>16} "
            f"{predicted.phase_bytes(phase) / GB:8.2f} GB"
        )
    print(predicted.render())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
