"""GPU memory of one evaluate job, planned before any job is submitted (issue 27: every 8B evaluate job
ran out of memory with the 32B teacher, the student and a vLLM engine asking for 90% of one GPU).

``evaluate.checkpoint_metrics`` runs in three phases that never hold two large models on the device:

- decode: the vLLM engine alone (student weights in bf16, an explicit KV cache, one scheduler step of
  activations), shut down before the next phase;
- teacher: the teacher alone in bf16, forward passes of ``score_tokens`` padded tokens; its hidden
  states at the sampled positions go to the host, its lm_head is kept. With ``evaluate.gpus`` > 1 its
  layers are spread over the job's GPUs (one computes at a time), so each holds 1/gpus of it;
- student: the student in bf16 with the teacher's lm_head, one pass of states at a time, the
  full-vocabulary reverse KL formed ``chunk_tokens`` positions at a time.

The CUDA context, vLLM's CUDA-graph pool and allocator fragmentation are what ``headroom`` is for.
The plan is a ``MemoryPlan`` over these phases (same rendering, same verdict as training's).
"""

from __future__ import annotations

import json
from pathlib import Path

from opdgeom.logprobs import DEFAULT_CHUNK_TOKENS
from opdgeom.rollout.greedy import ENGINE_BATCH_TOKENS
from opdgeom.train.memory_plan import (
    BF16,
    DEFAULT_HEADROOM,
    DEFAULT_PROMPT_TOKENS,
    FP32,
    GB,
    Component,
    MemoryPlan,
    largest_model,
    layer_forward_bytes,
    load_family_preset,
    sharded,
)

EVAL_PHASES = ("decode", "teacher", "student")


def eval_plan(family: dict, evaluate: dict, gpu_mem_gb: float, headroom: float = DEFAULT_HEADROOM) -> MemoryPlan:
    """The plan of one evaluate job on one GPU for the family's largest student and teacher, with the
    study's resolved ``evaluate`` settings (max_new_tokens, batch_size, samples, score_tokens,
    kv_cache_gb, gpus). The plan is of the fullest GPU: the first, which also runs decode and student."""
    student_name, s = largest_model(family, ("student", "student_alt"))
    teacher_name, t = largest_model(family, ("teacher", "teacher_alt"))
    s_params, t_params = sharded(s, 1).params, sharded(t, 1).params
    seq_tokens = DEFAULT_PROMPT_TOKENS + evaluate["max_new_tokens"]
    batch = evaluate["batch_size"]
    score_tokens = evaluate.get("score_tokens") or batch * seq_tokens
    kv_per_token = 2 * s.num_hidden_layers * s.kv_dim * BF16
    kv = int(evaluate["kv_cache_gb"] * 2**30) if evaluate.get("kv_cache_gb") else batch * seq_tokens * kv_per_token
    chunk = DEFAULT_CHUNK_TOKENS
    gpus = evaluate.get("gpus", 1)
    decode, teacher, student = ("decode",), ("teacher",), ("student",)
    components = (
        Component("engine weights", BF16 * s_params, "2 B x student params (vLLM, TP 1)", decode),
        Component(
            "engine kv cache",
            kv,
            "kv_cache_gb"
            if evaluate.get("kv_cache_gb")
            else f"{batch} seqs x {seq_tokens} tokens x 2 x L x kv_dim x 2 B",
            decode,
        ),  # fmt: skip
        Component(
            "engine step",
            layer_forward_bytes(s, ENGINE_BATCH_TOKENS) + batch * s.vocab_size * FP32,
            f"one layer over {ENGINE_BATCH_TOKENS} batched tokens + {batch} seqs x V x 4 B sampler logits",
            decode,
        ),
        Component(
            "teacher weights",
            -(-BF16 * t_params // gpus),
            "2 B x teacher params (bf16)" + (f" / {gpus} GPUs (spread)" if gpus > 1 else ""),
            teacher,
        ),  # fmt: skip
        Component(
            "teacher pass",
            layer_forward_bytes(t, score_tokens) + score_tokens * t.hidden_size * BF16,
            f"one layer over {score_tokens} tokens + the pass's final states (to the host after)",
            teacher,
        ),
        Component("student weights", BF16 * s_params, "2 B x student params (bf16)", student),
        Component("teacher head", BF16 * t.vocab_size * t.hidden_size, "2 B x V x H_teacher (kept lm_head)", student),
        Component(
            "student pass",
            layer_forward_bytes(s, score_tokens) + score_tokens * (s.hidden_size + t.hidden_size) * BF16,
            f"one layer over {score_tokens} tokens + both models' states of the pass",
            student,
        ),
        Component(
            "kl chunk",
            chunk * s.vocab_size * (2 * BF16 + 4 * FP32),
            f"{chunk} positions x V x (2 x 2 B logits + 4 x 4 B fp32 log-softmax, exp, product)",
            student,
        ),
    )
    return MemoryPlan(
        family=family["name"], gpus=gpus, gpu_mem_bytes=int(gpu_mem_gb * GB), headroom=headroom,
        student=student_name, teacher=teacher_name, student_params=s_params, teacher_params=t_params,
        micro_batch_tokens=score_tokens, chunk_tokens=chunk, components=components, phases=EVAL_PHASES,
    )  # fmt: skip


def check_evaluate_fits(family: dict, evaluate: dict, gpu_mem_gb: float, **options) -> MemoryPlan:
    """The plan, or ValueError naming the phase, its largest components and the settings to change."""
    result = eval_plan(family, evaluate, gpu_mem_gb, **options)
    if not result.fits:
        raise ValueError(
            f"an evaluate job of family {result.family!r} does not fit {result.gpus} x {gpu_mem_gb:g} GB: "
            f"{result.overflow(4)}; lower evaluate.batch_size, evaluate.score_tokens or evaluate.kv_cache_gb, "
            "spread the teacher over more GPUs (evaluate.gpus), or use larger GPUs"
        )
    return result


def main(family: str, gpu_mem_gb: float, as_json: bool = False) -> str:
    """What ``opdgeom memory-plan --evaluate`` prints: config/config.yaml's ``evaluate`` section with the
    family's merged over it, as the planner resolves it (it never refuses: the verdict is in the output)."""
    import yaml

    from opdgeom.config import deep_merge

    preset = load_family_preset(family)
    root = Path(__file__).resolve().parents[3]
    defaults = yaml.safe_load((root / "config" / "config.yaml").read_text())["evaluate"]
    result = eval_plan(preset, deep_merge(defaults, preset.get("evaluate", {})), gpu_mem_gb)
    return json.dumps(result.to_json(), indent=2) if as_json else result.render()
