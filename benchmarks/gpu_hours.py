"""GPU-hours of a hub family's study from FLOP counts and stated throughputs (an estimate, not a
measurement: every input is printed, and GPU measurements replace them in benchmarks/RESULTS.md).

    python benchmarks/gpu_hours.py --family qwen3-8b [--mfu 0.4] [--decode-tok-s 2500]

Formulas, per policy-gradient step (B prompts x G samples, P prompt + C completion tokens each):
  rollout    C x B x G generated tokens / (decode tok/s per GPU x W GPUs)     (vLLM, colocated)
  teacher    2 x N_teacher x (P + C) x B x G FLOPs / (peak x MFU x W)       (forward only)
  update     8 x N_student x (P + C) x B x G FLOPs / (peak x MFU x W)       (fwd + bwd + recompute)
SFT steps have the update only; evaluation decodes every checkpoint's held-out answers on one GPU
after loading it. The memory plan (opdgeom memory-plan) decides W: the family's train_resources.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opdgeom.config import load_family
from opdgeom.train.memory_plan import meta_model, shape_of

REPO = Path(__file__).resolve().parents[1]


def params(spec: dict) -> float:
    return sum(p.numel() for p in meta_model(shape_of(spec)).parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen3-8b")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation of training and scoring")
    ap.add_argument("--decode-tok-s", type=float, default=2500.0, help="vLLM decode tokens/s per GPU (8B)")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--completion-tokens", type=int, default=300, help="mean sampled length (cap: max_new_tokens)")
    ap.add_argument("--load-s", type=float, default=60.0, help="loading one checkpoint for evaluation")
    ap.add_argument("--pg-runs", type=int, default=16)
    ap.add_argument("--sft-runs", type=int, default=5)
    args = ap.parse_args()

    family = load_family(args.family, REPO / "config/families", REPO / "workflow/schemas/family.schema.yaml")
    train = family["train"]
    gpus = family.get("train_resources", {}).get("nodes", 1) * family.get("train_resources", {}).get("gpus_per_node", 8)
    n_student, n_teacher = params(family["models"]["student"]), params(family["models"]["teacher"])
    flops = args.peak_tflops * 1e12 * args.mfu * gpus
    seqs = train["batch_size"] * train["group_size"]
    tokens = seqs * (args.prompt_tokens + args.completion_tokens)
    rollout_s = seqs * args.completion_tokens / (args.decode_tok_s * gpus)
    teacher_s = 2 * n_teacher * tokens / flops
    update_s = 8 * n_student * tokens / flops
    pg_step = rollout_s + teacher_s + update_s
    sft_step = 8 * n_student * train["batch_size"] * (args.prompt_tokens + args.completion_tokens) / flops
    steps, checkpoints = train["steps"], train["steps"] // train["checkpoint_every"] + 1
    n_eval = family["data"]["n_eval"]
    eval_ckpt_s = args.load_s + n_eval * args.completion_tokens / args.decode_tok_s
    runs = args.pg_runs + args.sft_runs
    rows = [
        ("SFT", steps * sft_step * gpus / 3600, args.sft_runs),
        ("OPD / RLVR / mixtures / controls", steps * pg_step * gpus / 3600, args.pg_runs),
        ("evaluate (every checkpoint, one GPU)", checkpoints * eval_ckpt_s / 3600, runs),
    ]
    print(f"family {args.family}: student {n_student / 1e9:.2f}B, teacher {n_teacher / 1e9:.2f}B, {gpus} GPUs per run")
    print(
        f"assumed: {args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g}, decode {args.decode_tok_s:g} tok/s/GPU, "
        f"{args.prompt_tokens} + {args.completion_tokens} tokens per sequence"
    )
    print(
        f"one PG step: rollout {rollout_s:.1f} s + teacher {teacher_s:.1f} s + update {update_s:.1f} s "
        f"= {pg_step:.1f} s"
    )
    print("| stage | GPU-h per run | runs | GPU-h total |\n|---|---:|---:|---:|")
    for name, per_run, n in rows:
        print(f"| {name} | {per_run:.1f} | {n} | {per_run * n:.0f} |")
    print(f"| total | | | {sum(p * n for _, p, n in rows):.0f} |")


if __name__ == "__main__":
    main()
