"""Per-checkpoint held-out metrics: what each method is meant to change, measured on held-out prompts.

- ``accuracy``: greedy decoding, the domain's verifier (what RLVR's reward measures); the per-prompt
  outcomes are kept (``correct``) so that intervals can bootstrap over prompts.
- ``nll``: teacher-forced token NLL of the held-out demonstrations (what SFT minimises).
- ``sampled_reward``: the verifier's mean reward on those same sampled completions (what RLVR maximises).
- ``reverse_kl``: per-token reverse KL to the teacher on completions the checkpoint samples itself
  (what OPD minimises): mean over every sampled completion token of log pi_student - log pi_teacher,
  the same sampled-token estimator OPD trains on, at the training temperature.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from opdgeom.device import local_device
from opdgeom.logprobs import token_logprobs
from opdgeom.models import load_model, load_tokenizer
from opdgeom.rollout import HFEngine
from opdgeom.rollout.greedy import greedy_completions
from opdgeom.tasks import get_task
from opdgeom.tasks.files import read_jsonl
from opdgeom.tokens import PromptFormat, encode_completion, pack

KL_SEED = 1234  # the held-out completions of the reverse-KL metric are drawn with this seed


def eval_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what hub checkpoints are and vLLM serves), fp32 on CPU (the tiny study's numbers)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Teacher:
    model: torch.nn.Module
    format: PromptFormat


@torch.no_grad()
def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int):
    """log pi(y_t) of every completion token, one 1-D float32 tensor per row (teacher-forced)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        p, c = prompts[start : start + batch_size], completions[start : start + batch_size]
        rows = pack(p, c, pad_id)
        logp_BT = token_logprobs(model, rows["input_ids"].to(device), rows["attention_mask"].to(device)).float().cpu()
        mask_BT = rows["target_mask"].bool()
        out.extend(logp_BT[i][mask_BT[i, : logp_BT.shape[1]]] for i in range(len(p)))
    return out


def reverse_kl_terms(
    student, teacher, prompts, completions, pad_id: int, batch_size: int = 64, teacher_rows=None
) -> torch.Tensor:
    """Per-token log pi_student(y_t) - log pi_teacher(y_t) over every completion token, concatenated.

    ``teacher_rows`` = (prompts, completions) as the teacher reads them (its own prompt format); the
    completion tokens are the same, so the two per-row tensors line up token by token."""
    s = completion_logprobs(student, prompts, completions, pad_id, batch_size)
    t_prompts, t_completions = teacher_rows or (prompts, completions)
    t = completion_logprobs(teacher, t_prompts, t_completions, pad_id, batch_size)
    return torch.cat([a - b for a, b in zip(s, t)]) if s else torch.zeros(0)


def checkpoint_metrics(
    model_dir,
    examples,
    task,
    max_new_tokens: int,
    batch_size: int,
    teacher: Teacher | None = None,
    temperature: float = 1.0,
    chat: bool = False,
    engine: str = "hf",
) -> dict:
    """Greedy accuracy (and per-prompt ``correct``), held-out NLL and, given a teacher, reverse KL.
    ``chat``: the checkpoint is an instruct model prompted with its chat template (a hub teacher).
    ``engine="vllm"``: the greedy answers come from a vLLM engine (hub families); the teacher-forced
    scores and the reverse-KL samples stay on transformers."""
    tokenizer = load_tokenizer(model_dir)
    device = local_device()
    model = load_model(model_dir, dtype=eval_dtype(device), device=device).eval()
    sampler = HFEngine(model, tokenizer, batch_size=batch_size)
    prompts = [PromptFormat(tokenizer, chat).prompt(e.prompt) for e in examples]
    greedy = greedy_completions(model_dir, prompts, max_new_tokens, engine, batch_size) if engine == "vllm" else None
    completion_ids = greedy or sampler.sample(prompts, max_new_tokens, 0.0, seed=0).completion_ids
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    correct = [int(task.verify(text, e.answer)) for text, e in zip(texts, examples)]
    demos = [encode_completion(tokenizer, e.completion) for e in examples]
    nll = torch.cat(completion_logprobs(model, prompts, demos, tokenizer.pad_token_id, batch_size))
    result = {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "mean_completion_tokens": sum(map(len, completion_ids)) / len(correct),
        "nll": -nll.double().mean().item(),
        "correct": correct,
    }
    if teacher is not None:
        sampled = sampler.sample(prompts, max_new_tokens, temperature, seed=KL_SEED)
        eos = tokenizer.eos_token_id
        teacher_rows = (
            [teacher.format.prompt(e.prompt) for e in examples],
            [teacher.format.completion(c, eos) for c in sampled.completion_ids],
        )
        terms = reverse_kl_terms(
            model, teacher.model, prompts, sampled.completion_ids, tokenizer.pad_token_id, batch_size, teacher_rows
        )
        result["reverse_kl"] = terms.double().mean().item()
        sampled_texts = tokenizer.batch_decode(sampled.completion_ids, skip_special_tokens=True)
        result["sampled_reward"] = sum(task.verify(t, e.answer) for t, e in zip(sampled_texts, examples)) / len(
            examples
        )
    return result


def evaluate_checkpoints(
    ref: str,
    checkpoints: list[dict],
    eval_data: str | Path,
    domain: str,
    max_new_tokens: int,
    batch_size: int,
    teacher: str | Path | None = None,
    temperature: float = 1.0,
    chat: bool = False,
    teacher_chat: bool = False,
    engine: str = "hf",
) -> pl.DataFrame:
    """One row per checkpoint: ref, step, tokens, domain, accuracy, n, mean_completion_tokens, nll,
    correct (list of 0/1 per held-out prompt) and, with ``teacher``, reverse_kl and sampled_reward."""
    examples = read_jsonl(eval_data)
    task = get_task(domain)
    teacher_model = None
    if teacher is not None:
        device = local_device()
        model = load_model(teacher, dtype=eval_dtype(device), device=device).eval().requires_grad_(False)
        teacher_model = Teacher(model, PromptFormat(load_tokenizer(teacher), teacher_chat))
    rows = []
    for ckpt in checkpoints:
        t0 = time.perf_counter()
        result = checkpoint_metrics(
            ckpt["path"], examples, task, max_new_tokens, batch_size, teacher_model, temperature, chat, engine
        )
        rows.append({"ref": ref, "step": ckpt["step"], "tokens": ckpt.get("tokens", 0), "domain": domain, **result})
        kl = f" reverse KL {result['reverse_kl']:.4f}" if "reverse_kl" in result else ""
        print(
            f"{ref} step {ckpt['step']}: accuracy {result['accuracy']:.3f} on {result['n']}, "
            f"NLL {result['nll']:.4f}{kl} ({time.perf_counter() - t0:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    return pl.DataFrame(rows, schema_overrides={"tokens": pl.Int64, "correct": pl.List(pl.Int8)})
