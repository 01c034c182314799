"""Per-checkpoint held-out metrics: what each method is meant to change, measured on held-out prompts.

- ``accuracy``: greedy decoding, the domain's verifier (what RLVR's reward measures); the per-prompt
  outcomes are kept (``correct``) so that intervals can bootstrap over prompts.
- ``nll``: teacher-forced token NLL of the held-out demonstrations (what SFT minimises).
- ``sampled_reward``: the verifier's mean reward on completions the checkpoint samples itself at the
  training temperature, ``samples`` per prompt (what RLVR maximises).
- ``reverse_kl``: per-token reverse KL to the teacher on those same sampled completions (what OPD
  minimises): at every position of a sampled completion, KL(pi_student || pi_teacher) over the whole
  vocabulary, averaged over the positions. OPD trains on the sampled-token estimate of the same
  quantity (log pi_student(y_t) - log pi_teacher(y_t)); summing over the vocabulary removes the
  variance of the sampled token, which on 512 prompts was as large as the changes being measured.

The NLL and both sampled metrics also keep their per-prompt parts (``nll_sum_per_prompt``,
``nll_tokens_per_prompt``, ``reward_per_prompt``, ``kl_sum_per_prompt``, ``kl_tokens_per_prompt``) so
that a change between two checkpoints can be bootstrapped over prompts.
With one sample per prompt a reward near 0.5 has a standard error of 0.022 on 512 prompts, as large
as the changes the tiny study measures; ``samples`` draws more per prompt (same prompts, same seed).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from opdgeom.device import local_device
from opdgeom.eval_cache import EvalCache, path_digest
from opdgeom.logprobs import DEFAULT_CHUNK_TOKENS, final_hidden_states, token_logprobs
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


def _completion_hidden(model, prompts, completions, pad_id: int) -> torch.Tensor:
    """Final hidden states at the positions that predict a completion token, rows in order: (N, H)."""
    device = next(model.parameters()).device
    rows = pack(prompts, completions, pad_id)
    hidden_BTH = final_hidden_states(model, rows["input_ids"].to(device), rows["attention_mask"].to(device))
    return hidden_BTH[:, :-1][rows["target_mask"].bool().to(device)]


def _chunk_reverse_kl(student_head, teacher_head, h_student_NH, h_teacher_NH) -> torch.Tensor:
    """sum_v pi_s(v) (log pi_s(v) - log pi_t(v)) at N positions, in fp32 or wider."""
    logits_s_NV, logits_t_NV = student_head(h_student_NH), teacher_head(h_teacher_NH)
    if logits_s_NV.shape[-1] != logits_t_NV.shape[-1]:
        raise ValueError(
            f"reverse KL: student and teacher vocabularies differ ({logits_s_NV.shape[-1]} vs {logits_t_NV.shape[-1]})"
        )
    wide = torch.promote_types(logits_s_NV.dtype, torch.float32)
    logp_s_NV, logp_t_NV = logits_s_NV.to(wide).log_softmax(-1), logits_t_NV.to(wide).log_softmax(-1)
    return (logp_s_NV.exp() * (logp_s_NV - logp_t_NV)).sum(-1)


@torch.no_grad()
def reverse_kl_rows(
    student, teacher, prompts, completions, pad_id: int, batch_size: int = 64, teacher_rows=None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[torch.Tensor]:  # fmt: skip
    """Per row, the reverse KL(pi_student || pi_teacher) over the whole vocabulary at every position that
    predicts one of its completion tokens (one value per completion token).

    On the student's own samples this is the exact expectation of OPD's sampled-token advantage
    log pi_s(y_t) - log pi_t(y_t) over y_t at each position: the same quantity without the variance of
    the sampled token. Logits are formed ``chunk_tokens`` positions at a time (never B x T x V).
    ``teacher_rows`` = (prompts, completions) as the teacher reads them (its own prompt format); the
    completion tokens are the same, so the two models' positions line up token by token."""
    t_prompts, t_completions = teacher_rows or (prompts, completions)
    heads = (student.get_output_embeddings(), teacher.get_output_embeddings())
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        h_s_NH = _completion_hidden(student, prompts[batch], completions[batch], pad_id)
        h_t_NH = _completion_hidden(teacher, t_prompts[batch], t_completions[batch], pad_id).to(h_s_NH.device)
        kl_N = torch.cat(
            [_chunk_reverse_kl(*heads, h_s_NH[i : i + chunk_tokens], h_t_NH[i : i + chunk_tokens])
             for i in range(0, h_s_NH.shape[0], chunk_tokens)]
        )  # fmt: skip
        out.extend(kl_N.cpu().split([len(c) for c in completions[batch]]))
    return out


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
    samples: int = 1,
) -> dict:
    """Greedy accuracy (and per-prompt ``correct``), held-out NLL (and each prompt's summed NLL and token
    count) and, given a teacher, reverse KL.
    ``chat``: the checkpoint is an instruct model prompted with its chat template (a hub teacher).
    ``engine="vllm"``: the greedy answers come from a vLLM engine (hub families); the teacher-forced
    scores and the reverse-KL samples stay on transformers. ``samples``: completions per prompt of the
    sampled metrics (reverse KL, reward)."""
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
    logp_rows = completion_logprobs(model, prompts, demos, tokenizer.pad_token_id, batch_size)
    result = {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "mean_completion_tokens": sum(map(len, completion_ids)) / len(correct),
        "nll": -torch.cat(logp_rows).double().mean().item(),
        "correct": correct,
        "nll_sum_per_prompt": [-logp_T.double().sum().item() for logp_T in logp_rows],
        "nll_tokens_per_prompt": [logp_T.numel() for logp_T in logp_rows],
    }
    if teacher is not None:
        sampled = sampled_metrics(
            model, tokenizer, teacher, task, examples, prompts, max_new_tokens, temperature, samples, batch_size
        )
        result.update(sampled)
    return result


def sampled_metrics(
    model, tokenizer, teacher: Teacher, task, examples, prompts, max_new_tokens: int, temperature: float,
    samples: int, batch_size: int,
) -> dict:  # fmt: skip
    """Reverse KL to the teacher and the verifier's reward on ``samples`` completions per prompt drawn at
    ``temperature`` (seed KL_SEED): the totals and each prompt's parts, prompts in order."""
    if samples < 1:
        raise ValueError(f"evaluate: samples must be >= 1, got {samples}")
    repeated = [i for i in range(len(examples)) for _ in range(samples)]
    sampler = HFEngine(model, tokenizer, batch_size=batch_size)
    sampled = sampler.sample([prompts[i] for i in repeated], max_new_tokens, temperature, seed=KL_SEED)
    eos = tokenizer.eos_token_id
    teacher_rows = (
        [teacher.format.prompt(examples[i].prompt) for i in repeated],
        [teacher.format.completion(c, eos) for c in sampled.completion_ids],
    )
    rows = (sampled.prompt_ids, sampled.completion_ids)
    kl_rows = reverse_kl_rows(model, teacher.model, *rows, tokenizer.pad_token_id, batch_size, teacher_rows)
    texts = tokenizer.batch_decode(sampled.completion_ids, skip_special_tokens=True)
    n = len(examples)
    kl_sum, kl_tokens, reward = [0.0] * n, [0] * n, [0.0] * n
    for i, kl_T, text in zip(repeated, kl_rows, texts):
        kl_sum[i] += kl_T.double().sum().item()
        kl_tokens[i] += kl_T.numel()
        reward[i] += task.verify(text, examples[i].answer) / samples
    return {
        "reverse_kl": sum(kl_sum) / max(sum(kl_tokens), 1),
        "sampled_reward": sum(reward) / n,
        "samples": samples,
        "reward_per_prompt": reward,
        "kl_sum_per_prompt": kl_sum,
        "kl_tokens_per_prompt": kl_tokens,
    }


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
    samples: int = 1,
    cache: str | Path | None = None,
) -> pl.DataFrame:
    """One row per checkpoint: ref, step, tokens, domain, accuracy, n, mean_completion_tokens, nll,
    correct (list of 0/1 per held-out prompt), nll_sum_per_prompt, nll_tokens_per_prompt and, with
    ``teacher``, reverse_kl and sampled_reward on ``samples`` completions per prompt, with their per-prompt parts.
    ``cache``: a folder of results addressed by content (opdgeom.eval_cache); a checkpoint evaluated
    before with the same data, teacher and settings (a run's init, shared by every run from it) is read
    back instead of evaluated again."""
    examples = read_jsonl(eval_data)
    task = get_task(domain)
    device = local_device()
    teacher_model = None
    if teacher is not None:
        model = load_model(teacher, dtype=eval_dtype(device), device=device).eval().requires_grad_(False)
        teacher_model = Teacher(model, PromptFormat(load_tokenizer(teacher), teacher_chat))
    store = EvalCache(cache) if cache is not None else None
    settings = {
        "eval_data": path_digest(eval_data), "domain": domain, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "teacher": path_digest(teacher) if teacher is not None else None,
        "temperature": temperature, "chat": chat, "teacher_chat": teacher_chat, "engine": engine,
        "samples": samples, "kl_seed": KL_SEED, "device": device.type, "torch": torch.__version__,
    } if store is not None else {}  # fmt: skip
    rows = []
    for ckpt in checkpoints:
        t0 = time.perf_counter()
        key = store.key(path_digest(ckpt["path"]), settings) if store is not None else None
        result = store.get(key) if store is not None else None
        cached = result is not None
        if not cached:
            result = checkpoint_metrics(
                ckpt["path"], examples, task, max_new_tokens, batch_size, teacher_model, temperature, chat, engine,
                samples,
            )  # fmt: skip
            if store is not None:
                store.put(key, result)
        rows.append({"ref": ref, "step": ckpt["step"], "tokens": ckpt.get("tokens", 0), "domain": domain, **result})
        kl = f" reverse KL {result['reverse_kl']:.4f}" if "reverse_kl" in result else ""
        print(
            f"{ref} step {ckpt['step']}: accuracy {result['accuracy']:.3f} on {result['n']}, "
            f"NLL {result['nll']:.4f}{kl} ({time.perf_counter() - t0:.1f}s{', cached' if cached else ''})",
            file=sys.stderr,
            flush=True,
        )
    lists = {"correct": pl.List(pl.Int8), "nll_sum_per_prompt": pl.List(pl.Float64),
             "nll_tokens_per_prompt": pl.List(pl.Int64), "reward_per_prompt": pl.List(pl.Float64),
             "kl_sum_per_prompt": pl.List(pl.Float64), "kl_tokens_per_prompt": pl.List(pl.Int64)}  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"tokens": pl.Int64, **{k: v for k, v in lists.items() if k in rows[0]}})
