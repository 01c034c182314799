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
from pathlib import Path

import polars as pl
import torch

from opdgeom.device import local_device
from opdgeom.logprobs import token_logprobs
from opdgeom.models import load_model, load_tokenizer
from opdgeom.rollout import HFEngine
from opdgeom.tasks import get_task
from opdgeom.tasks.files import read_jsonl
from opdgeom.tokens import encode_completion, encode_prompt, pack

KL_SEED = 1234  # the held-out completions of the reverse-KL metric are drawn with this seed


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


def reverse_kl_terms(student, teacher, prompts, completions, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Per-token log pi_student(y_t) - log pi_teacher(y_t) over every completion token, concatenated."""
    s = completion_logprobs(student, prompts, completions, pad_id, batch_size)
    t = completion_logprobs(teacher, prompts, completions, pad_id, batch_size)
    return torch.cat([a - b for a, b in zip(s, t)]) if s else torch.zeros(0)


def checkpoint_metrics(
    model_dir, examples, task, max_new_tokens: int, batch_size: int, teacher=None, temperature: float = 1.0
) -> dict:
    """Greedy accuracy (and per-prompt ``correct``), held-out NLL and, given a teacher, reverse KL."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device=local_device()).eval()
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
    rollouts = engine.sample(prompts, max_new_tokens, 0.0, seed=0)
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    correct = [int(task.verify(text, e.answer)) for text, e in zip(texts, examples)]
    demos = [encode_completion(tokenizer, e.completion) for e in examples]
    nll = torch.cat(completion_logprobs(model, prompts, demos, tokenizer.pad_token_id, batch_size))
    result = {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "mean_completion_tokens": sum(map(len, rollouts.completion_ids)) / len(correct),
        "nll": -nll.double().mean().item(),
        "correct": correct,
    }
    if teacher is not None:
        sampled = engine.sample(prompts, max_new_tokens, temperature, seed=KL_SEED)
        terms = reverse_kl_terms(model, teacher, prompts, sampled.completion_ids, tokenizer.pad_token_id, batch_size)
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
) -> pl.DataFrame:
    """One row per checkpoint: ref, step, tokens, domain, accuracy, n, mean_completion_tokens, nll,
    correct (list of 0/1 per held-out prompt) and, with ``teacher``, reverse_kl and sampled_reward."""
    examples = read_jsonl(eval_data)
    task = get_task(domain)
    teacher_model = None
    if teacher is not None:
        teacher_model = load_model(teacher, device=local_device()).eval().requires_grad_(False)
    rows = []
    for ckpt in checkpoints:
        t0 = time.perf_counter()
        result = checkpoint_metrics(
            ckpt["path"], examples, task, max_new_tokens, batch_size, teacher_model, temperature
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
