"""GPU-hours of a hub family's study from FLOP counts and stated throughputs, over the runs the planner
actually expands (an estimate, not a measurement: every input is printed, and GPU measurements replace
them in benchmarks/RESULTS.md).

    python benchmarks/gpu_hours.py --family qwen3-8b [--mfu 0.4] [--decode-tok-s 2500]

Per run, on the family's train_resources (W GPUs), from its own run spec (steps, batch, group size,
teacher, behaviour copy, student size, rollout cap); C, the mean sampled length, is fill x the run's
max_new_tokens, and an SFT demonstration's length is fill x its source's max_tokens (P + C without one):
  rollout    C x B x G generated tokens / (decode tok/s per GPU x W)              (vLLM, colocated)
  teacher    2 x N_teacher x (P + C) x B x G FLOPs / (peak x MFU x W)     (OPD and mixtures; forward)
  behaviour  2 x N_student x (P + C) x B x G FLOPs / (peak x MFU x W)   (off-policy runs: the frozen copy)
  update     8 x N_student x (P + C) x B x G FLOPs / (peak x MFU x W)     (fwd + bwd + recompute)
  sync       a weight sync whenever the sampler changes (on-policy: every step; lagged: every lag)
  SFT steps: 8 x N_student x demonstration length x B; every run: start-up, one save per checkpoint.
Evaluate, per evaluated checkpoint on evaluate.gpus GPUs, in its three phases: an engine start and the
greedy + sampled decoding (fill x evaluate.max_new_tokens each), the teacher's load and forward over
the samples, the student's load and forward over the demonstrations and samples. Benchmarks (family
key benchmarks), per evaluated checkpoint: problems x k x (fill x max_new_tokens) decoded tokens /
decode tok/s on one GPU, plus an engine start and the student's load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from opdgeom.plan import Study
from opdgeom.train.memory_plan import meta_model, shape_of

REPO = Path(__file__).resolve().parents[1]
# Problems per benchmark source (the data sets' cards: MATH-500's test split, AIME 2024's 30, GSM8K's test).
BENCHMARK_PROBLEMS = {"HuggingFaceH4/MATH-500": 500, "HuggingFaceH4/aime_2024": 30, "openai/gsm8k": 1319}


def params(spec: dict) -> float:
    return sum(p.numel() for p in meta_model(shape_of(spec)).parameters())


def base_model(study: Study, name: str) -> str:
    """The family model a run starts from, through its chain of inits."""
    while name in study.runs:
        name = study.runs[name].init
    return name


def sync_share(behaviour) -> float:
    """Weight syncs per step: every step on-policy, every lag steps for a lagged copy, none for the anchor."""
    if behaviour is None:
        return 1.0
    return 1.0 / behaviour.lag if behaviour.policy == "lagged" else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen3-8b")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation of training and scoring")
    ap.add_argument("--decode-tok-s", type=float, default=2500.0, help="vLLM decode tokens/s per GPU (8B)")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--fill", type=float, default=0.5, help="mean generated (or demonstration) length / its cap")
    ap.add_argument("--load-gb-s", type=float, default=2.0, help="reading a model folder, GB/s (shared FS)")
    ap.add_argument("--startup-s", type=float, default=300.0, help="a training job's start (loads, engines, graphs)")
    ap.add_argument("--save-s", type=float, default=120.0, help="one checkpoint: HF export + DCP state")
    ap.add_argument("--sync-s", type=float, default=5.0, help="one weight sync into the colocated engines")
    ap.add_argument("--engine-start-s", type=float, default=90.0, help="one evaluation engine (CUDA graphs)")
    args = ap.parse_args()

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["family"] = args.family
    study = Study.from_config(config, REPO / "config" / "families", REPO / "workflow" / "schemas")
    r = study.train_resources
    gpus = r.nodes * r.gpus_per_node
    sizes = {name: params(spec) for name, spec in study.models.items()}
    flops = args.peak_tflops * 1e12 * args.mfu
    groups: dict[str, list[float]] = {}
    for name, spec in study.runs.items():
        t = spec.train
        n_student = sizes[base_model(study, spec.init)]
        completion = args.fill * t.max_new_tokens
        if spec.method == "sft":
            demo_cap = ((study.data_sources(spec.domain) or {}).get("sft") or {}).get("max_tokens")
            demo = args.fill * demo_cap if demo_cap else args.prompt_tokens + completion
            step_s = 8 * n_student * t.batch_size * demo / (flops * gpus)
            group = "SFT anchors and SFT controls"
        else:
            seqs = t.batch_size * t.group_size
            tokens = seqs * (args.prompt_tokens + completion)
            step_s = seqs * completion / (args.decode_tok_s * gpus) + 8 * n_student * tokens / (flops * gpus)
            if spec.teacher is not None:
                step_s += 2 * sizes[spec.teacher] * tokens / (flops * gpus)
            if spec.behaviour is not None:
                step_s += 2 * n_student * tokens / (flops * gpus)
            step_s += sync_share(spec.behaviour) * args.sync_s
            group = "OPD / RLVR / mixtures / controls"
        run_s = args.startup_s + t.steps * step_s + len(t.checkpoint_steps) * args.save_s
        groups.setdefault(group, []).append(run_s * gpus / 3600)

    ev = study.evaluate
    n_eval, eval_gpus = study.data["n_eval"], ev.get("gpus", 1)
    n_s, n_t = sizes["student"], sizes["teacher"]
    eval_completion = args.fill * ev["max_new_tokens"]
    seq = args.prompt_tokens + eval_completion
    decode_s = n_eval * (1 + ev.get("samples", 1)) * eval_completion / args.decode_tok_s
    teacher_s = 2 * n_t / args.load_gb_s / 1e9 + 2 * n_t * n_eval * ev.get("samples", 1) * seq / (flops * eval_gpus)
    student_s = 2 * n_s / args.load_gb_s / 1e9 + 2 * n_s * n_eval * (1 + ev.get("samples", 1)) * seq / flops
    ckpt_s = args.engine_start_s + decode_s + teacher_s + student_s
    evaluated = 0
    for ref in study.eval_refs:
        evaluated += len(study.runs[ref].train.checkpoint_steps) + 1 if ref in study.runs else 1
    rows = [(g, sum(v) / len(v), len(v)) for g, v in groups.items()]
    rows.append((f"evaluate ({evaluated} checkpoints, {eval_gpus} GPU each)", ckpt_s * eval_gpus / 3600 * evaluated, 1))
    for name, bench in study.benchmarks.items():
        problems = BENCHMARK_PROBLEMS[study.benchmark_source(name)["dataset"]]
        tokens = problems * bench.k * args.fill * bench.max_new_tokens
        bench_s = args.engine_start_s + tokens / args.decode_tok_s + 2 * n_s / args.load_gb_s / 1e9
        rows.append((f"benchmark {name} ({problems} x {bench.k}, {bench.max_new_tokens} tokens max)",
                     bench_s / 3600 * evaluated, 1))  # fmt: skip

    print(
        f"family {args.family}: {len(study.runs)} runs, student {n_s / 1e9:.2f}B, teacher {n_t / 1e9:.2f}B, "
        f"{gpus} GPUs per run"
    )
    print(
        f"assumed: {args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g}, decode {args.decode_tok_s:g} tok/s/GPU, "
        f"{args.prompt_tokens}-token prompts, generations {args.fill:g} x their cap, start-up {args.startup_s:g} s, "
        f"save {args.save_s:g} s per checkpoint, sync {args.sync_s:g} s, model reads {args.load_gb_s:g} GB/s, "
        f"evaluation engine start {args.engine_start_s:g} s"
    )
    print(f"one evaluated checkpoint: {ckpt_s / 60:.1f} min (decode {decode_s:.0f} s, teacher {teacher_s:.0f} s, "
          f"student {student_s:.0f} s)")  # fmt: skip
    print("| stage | GPU-h per run | runs | GPU-h total |\n|---|---:|---:|---:|")
    for name, per_run, n in rows:
        print(f"| {name} | {per_run:.1f} | {n} | {per_run * n:.0f} |")
    print(f"| total | | | {sum(p * n for _, p, n in rows):.0f} |")


if __name__ == "__main__":
    main()
