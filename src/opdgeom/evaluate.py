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

import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from opdgeom.device import free_cached_memory, local_device
from opdgeom.eval_cache import EvalCache, path_digest
from opdgeom.logprobs import DEFAULT_CHUNK_TOKENS, final_hidden_states, token_logprobs
from opdgeom.models import load_model, load_tokenizer
from opdgeom.rollout import HFEngine
from opdgeom.rollout.greedy import engine_completions
from opdgeom.tasks import get_task
from opdgeom.tasks.files import read_jsonl
from opdgeom.tokens import PromptFormat, encode_completion, pack

KL_SEED = 1234  # the held-out completions of the reverse-KL metric are drawn with this seed
AVG_K_SEED = 4321  # the k samples per problem of avg@k accuracy


def eval_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what hub checkpoints are and vLLM serves), fp32 on CPU (the tiny study's numbers)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Teacher:
    """The teacher of the reverse-KL metric: a loaded model, or a folder loaded for each checkpoint's
    teacher phase and released after it (``Teacher.at``: on a GPU the teacher and the student never
    share the device; on the CPU the tiny teacher stays loaded)."""

    model: torch.nn.Module | None
    format: PromptFormat
    path: Path | None = None

    @classmethod
    def at(cls, path: str | Path, chat: bool, device: torch.device) -> Teacher:
        fmt = PromptFormat(load_tokenizer(path), chat)
        return cls(_load_frozen(path, device) if device.type == "cpu" else None, fmt, Path(path))

    def load(self, device: torch.device) -> torch.nn.Module:
        return self.model if self.model is not None else _load_frozen(self.path, device)


def _load_frozen(path, device: torch.device) -> torch.nn.Module:
    """The teacher in eval dtype; on an evaluate job given several GPUs, spread over all of them."""
    spread = device.type == "cuda" and torch.cuda.device_count() > 1
    return load_model(path, dtype=eval_dtype(device), device=device, spread=spread).eval().requires_grad_(False)


def _row_batches(lengths: list[int], batch_size: int, max_tokens: int | None) -> list[slice]:
    """Consecutive rows in passes of at most ``batch_size`` rows and, given ``max_tokens``, at most that
    many padded tokens (rows x the longest row); a row longer than ``max_tokens`` gets a pass alone."""
    out, start = [], 0
    while start < len(lengths):
        end, longest = start, 0
        while end < len(lengths) and end - start < batch_size:
            longest_then = max(longest, lengths[end])
            if max_tokens is not None and end > start and (end - start + 1) * longest_then > max_tokens:
                break
            longest, end = longest_then, end + 1
        out.append(slice(start, end))
        start = end
    return out


def _passes(prompts, completions, batch_size: int, max_tokens: int | None) -> list[slice]:
    return _row_batches([len(p) + len(c) for p, c in zip(prompts, completions)], batch_size, max_tokens)


@torch.no_grad()
def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int,
    max_tokens: int | None = None,
):  # fmt: skip
    """log pi(y_t) of every completion token, one 1-D float32 tensor per row (teacher-forced)."""
    out = []
    device = next(model.parameters()).device
    for batch in _passes(prompts, completions, batch_size, max_tokens):
        p, c = prompts[batch], completions[batch]
        rows = pack(p, c, pad_id)
        mask_BT = rows["target_mask"].bool()
        ids_BT, attention_BT = rows["input_ids"].to(device), rows["attention_mask"].to(device)
        logp_BT = token_logprobs(model, ids_BT, attention_BT, positions_BT=mask_BT.to(device)).float().cpu()
        out.extend(logp_BT[i][mask_BT[i, : logp_BT.shape[1]]] for i in range(len(p)))
    return out


@torch.no_grad()
def completion_states(
    model, prompts, completions, pad_id: int, batch_size: int, max_tokens: int | None = None,
    to: torch.device | None = None,
) -> torch.Tensor:  # fmt: skip
    """Final hidden states at every position that predicts a completion token, rows in order: (N, H),
    moved to ``to`` pass by pass (the teacher phase keeps them on the host while the student loads)."""
    device = next(model.parameters()).device
    pieces = []
    for batch in _passes(prompts, completions, batch_size, max_tokens):
        rows = pack(prompts[batch], completions[batch], pad_id)
        hidden_BTH = final_hidden_states(model, rows["input_ids"].to(device), rows["attention_mask"].to(device))
        pieces.append(hidden_BTH[:, :-1][rows["target_mask"].bool().to(device)].to(to or device))
    return torch.cat(pieces)


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
def reverse_kl_from_states(
    student_head, teacher_head, h_student_NH, h_teacher_NH, lengths: list[int],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[torch.Tensor]:  # fmt: skip
    """Per row (``lengths`` completion tokens each), the full-vocabulary reverse KL at its positions from
    the two models' final hidden states; logits are formed ``chunk_tokens`` positions at a time (never
    N x V), the teacher's states brought to the student's device chunk by chunk."""
    device = h_student_NH.device
    kl_N = torch.cat(
        [_chunk_reverse_kl(student_head, teacher_head, h_student_NH[i : i + chunk_tokens],
                           h_teacher_NH[i : i + chunk_tokens].to(device))
         for i in range(0, h_student_NH.shape[0], chunk_tokens)]
    )  # fmt: skip
    return list(kl_N.cpu().split(lengths))


def reverse_kl_rows(
    student, teacher, prompts, completions, pad_id: int, batch_size: int = 64, teacher_rows=None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[torch.Tensor]:  # fmt: skip
    """Per row, the reverse KL(pi_student || pi_teacher) over the whole vocabulary at every position that
    predicts one of its completion tokens (one value per completion token).

    On the student's own samples this is the exact expectation of OPD's sampled-token advantage
    log pi_s(y_t) - log pi_t(y_t) over y_t at each position: the same quantity without the variance of
    the sampled token. ``teacher_rows`` = (prompts, completions) as the teacher reads them (its own
    prompt format); the completion tokens are the same, so the two models' positions line up token by
    token. Both models at once: ``checkpoint_metrics`` runs the same computation in two phases."""
    t_prompts, t_completions = teacher_rows or (prompts, completions)
    h_t_NH = completion_states(teacher, t_prompts, t_completions, pad_id, batch_size)
    h_s_NH = completion_states(student, prompts, completions, pad_id, batch_size)
    heads = (student.get_output_embeddings(), teacher.get_output_embeddings())
    return reverse_kl_from_states(*heads, h_s_NH, h_t_NH, [len(c) for c in completions], chunk_tokens)


@dataclass(frozen=True)
class EvalSettings:
    """How one checkpoint is evaluated (the ``evaluate:`` section, resolved)."""

    max_new_tokens: int
    batch_size: int
    temperature: float = 1.0
    chat: bool = False
    engine: str = "hf"
    samples: int = 1
    score_tokens: int | None = None  # padded tokens per teacher-forced pass (None: batch_size rows)
    kv_cache_bytes: int | None = None  # the vLLM engine's KV cache (None: batch_size whole sequences)
    # Accuracy's decoding: greedy (k = 1, temperature 0), or avg@k: k samples per problem at
    # accuracy_temperature / top_p, each scored, the problem's accuracy the share correct.
    k: int = 1
    accuracy_temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.samples < 1 or self.k < 1:
            raise ValueError(f"evaluate: samples and k must be >= 1, got samples={self.samples}, k={self.k}")
        if (self.k > 1) != (self.accuracy_temperature > 0) or not 0 < self.top_p <= 1:
            raise ValueError(
                f"evaluate: avg@k needs k > 1 with accuracy_temperature > 0 (greedy: k 1, temperature 0) and "
                f"0 < top_p <= 1, got k={self.k}, accuracy_temperature={self.accuracy_temperature}, top_p={self.top_p}"
            )

    @property
    def decoding(self) -> str:
        return "greedy" if self.k == 1 else f"avg@{self.k} (T={self.accuracy_temperature:g}, top_p={self.top_p:g})"


def checkpoint_metrics(model_dir, examples, task, settings: EvalSettings, teacher: Teacher | None = None) -> dict:
    """Accuracy (and per-problem ``correct``: 0/1 greedy, or under avg@k the share of the k samples the
    verifier accepts, seed AVG_K_SEED), held-out NLL (and each prompt's summed NLL and token count) and,
    given a teacher, reverse KL and the sampled reward on ``settings.samples`` completions per prompt drawn
    at ``settings.temperature`` (seed KL_SEED).

    In three phases, so that no two large models share a GPU: (1) decoding, greedy and sampled, on the
    engine alone (``engine="vllm"``: a vLLM engine with an explicit KV budget, shut down after; ``hf``:
    transformers generate on the student); (2) the teacher alone, its final hidden states at the
    sampled completions' positions kept on the host, its lm_head kept; (3) the student: NLL of the
    demonstrations, its hidden states on the samples, the reverse KL chunk by chunk. ``chat``: the
    checkpoint is an instruct model prompted with its chat template (a hub teacher)."""
    tokenizer = load_tokenizer(model_dir)
    device = local_device()
    prompts = [PromptFormat(tokenizer, settings.chat).prompt(e.prompt) for e in examples]
    repeated = [i for i in range(len(examples)) for _ in range(settings.samples)] if teacher else []
    k = settings.k
    accuracy_request = (
        [p for p in prompts for _ in range(k)],
        settings.accuracy_temperature,
        AVG_K_SEED if k > 1 else 0,
    )
    requests = [(*accuracy_request, settings.top_p)]  # (prompts, temperature, seed, top_p)
    requests += [([prompts[i] for i in repeated], settings.temperature, KL_SEED, 1.0)] * bool(teacher)
    model = None
    if settings.engine == "vllm":  # phase 1 on the engine: no transformers model is on the GPU yet
        decoded = engine_completions(
            model_dir, requests, settings.max_new_tokens, settings.batch_size, settings.kv_cache_bytes
        )
    else:
        model = load_model(model_dir, dtype=eval_dtype(device), device=device).eval()
        sampler = HFEngine(model, tokenizer, batch_size=settings.batch_size)
        decoded = [
            sampler.sample(p, settings.max_new_tokens, temp, seed=seed, top_p=top_p).completion_ids
            for p, temp, seed, top_p in requests
        ]
        del sampler  # it holds the model, which the teacher phase may need gone
    completion_ids = decoded[0]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    scores = task.verify_many(texts, [examples[i // k].answer for i in range(len(texts))])
    correct = (
        [int(s) for s in scores] if k == 1 else [sum(scores[i * k : (i + 1) * k]) / k for i in range(len(examples))]
    )
    teacher_part = None
    if teacher is not None:
        if teacher.model is None and model is not None:  # the teacher phase has the device to itself
            model = _release(model)
        teacher_part = _teacher_phase(teacher, examples, repeated, decoded[1], tokenizer, settings, device)
    if model is None:
        model = load_model(model_dir, dtype=eval_dtype(device), device=device).eval()
    demos = [encode_completion(tokenizer, e.completion) for e in examples]
    pad = tokenizer.pad_token_id
    logp_rows = completion_logprobs(model, prompts, demos, pad, settings.batch_size, settings.score_tokens)
    result = {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "mean_completion_tokens": sum(map(len, completion_ids)) / len(completion_ids),
        **({"k": k} if k > 1 else {}),
        "nll": -torch.cat(logp_rows).double().mean().item(),
        "correct": correct,
        "nll_sum_per_prompt": [-logp_T.double().sum().item() for logp_T in logp_rows],
        "nll_tokens_per_prompt": [logp_T.numel() for logp_T in logp_rows],
    }
    if teacher_part is not None:
        head, h_t_NH = teacher_part
        kl_rows = _student_reverse_kl(
            model, head.to(device), h_t_NH, [prompts[i] for i in repeated], decoded[1], pad, settings
        )
        sampled_texts = tokenizer.batch_decode(decoded[1], skip_special_tokens=True)
        result.update(_sampled_parts(task, examples, repeated, kl_rows, sampled_texts, settings.samples))
    return result


def _student_reverse_kl(model, teacher_head, h_t_NH, prompts, completions, pad_id: int, settings) -> list:
    """The reverse KL rows pass by pass: one pass of the student's states on the device at a time, the
    teacher's matching positions (stored in row order) brought over as they are needed."""
    kl_rows, offset = [], 0
    for batch in _passes(prompts, completions, settings.batch_size, settings.score_tokens):
        h_s_NH = completion_states(model, prompts[batch], completions[batch], pad_id, settings.batch_size)
        lengths = [len(c) for c in completions[batch]]
        h_t_batch = h_t_NH[offset : offset + h_s_NH.shape[0]]
        kl_rows += reverse_kl_from_states(model.get_output_embeddings(), teacher_head, h_s_NH, h_t_batch, lengths)
        offset += h_s_NH.shape[0]
    return kl_rows


def _teacher_phase(teacher: Teacher, examples, repeated, completions, tokenizer, settings, device):
    """The teacher's lm_head and its final hidden states at the sampled completions' positions (on the
    host when the teacher was loaded for this phase only: it is released before the student loads)."""
    model = teacher.load(device)
    eos = tokenizer.eos_token_id
    t_prompts = [teacher.format.prompt(examples[i].prompt) for i in repeated]
    t_completions = [teacher.format.completion(c, eos) for c in completions]
    keep = teacher.model is not None
    host = None if keep else torch.device("cpu")
    h_t_NH = completion_states(
        model, t_prompts, t_completions, tokenizer.pad_token_id, settings.batch_size, settings.score_tokens, to=host
    )
    head = model.get_output_embeddings()
    if not keep:
        head = copy.deepcopy(head).to("cpu")
        model = _release(model)
    return head, h_t_NH


def _release(model) -> None:
    """Drop the caller's last reference (it rebinds its name to the None returned) and give the memory
    back to the device before the next phase loads."""
    del model
    gc.collect()
    free_cached_memory()


def _sampled_parts(task, examples, repeated, kl_rows, texts, samples: int) -> dict:
    n = len(examples)
    kl_sum, kl_tokens, reward = [0.0] * n, [0] * n, [0.0] * n
    rewards = task.verify_many(texts, [examples[i].answer for i in repeated])
    for i, kl_T, r in zip(repeated, kl_rows, rewards):
        kl_sum[i] += kl_T.double().sum().item()
        kl_tokens[i] += kl_T.numel()
        reward[i] += r / samples
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
    settings: EvalSettings,
    teacher: str | Path | None = None,
    teacher_chat: bool = False,
    cache: str | Path | None = None,
    tracker=None,
) -> pl.DataFrame:
    """One row per checkpoint: ref, step, tokens, domain, accuracy, n, mean_completion_tokens, nll,
    correct (list of 0/1 per held-out prompt), nll_sum_per_prompt, nll_tokens_per_prompt and, with
    ``teacher``, reverse_kl and sampled_reward on ``settings.samples`` completions per prompt, with their
    per-prompt parts. ``cache``: a folder of results addressed by content (opdgeom.eval_cache); a
    checkpoint evaluated before with the same data, teacher and settings (a run's init, shared by every
    run from it) is read back instead of evaluated again. ``tracker`` (an ``opdgeom.tracking.Tracker``)
    gets each checkpoint's scalar metrics at its step, under ``eval/``."""
    examples = read_jsonl(eval_data)
    task = get_task(domain)
    device = local_device()
    teacher_model = Teacher.at(teacher, teacher_chat, device) if teacher is not None else None
    store = EvalCache(cache) if cache is not None else None
    key_settings = {
        "eval_data": path_digest(eval_data), "domain": domain, "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size, "teacher": path_digest(teacher) if teacher is not None else None,
        "temperature": settings.temperature, "chat": settings.chat, "teacher_chat": teacher_chat,
        "engine": settings.engine, "samples": settings.samples, "kl_seed": KL_SEED, "device": device.type,
        "torch": torch.__version__,
        # Set only when they differ from the defaults, so results cached before they existed stay valid;
        # a vLLM evaluation now also samples on the engine.
        **({"sampled_on": "engine"} if settings.engine == "vllm" else {}),
        **({"score_tokens": settings.score_tokens} if settings.score_tokens is not None else {}),
        **({"k": settings.k, "accuracy_temperature": settings.accuracy_temperature, "top_p": settings.top_p,
            "avg_k_seed": AVG_K_SEED} if settings.k > 1 else {}),
    } if store is not None else {}  # fmt: skip
    rows = []
    for ckpt in checkpoints:
        t0 = time.perf_counter()
        key = store.key(path_digest(ckpt["path"]), key_settings) if store is not None else None
        result = store.get(key) if store is not None else None
        cached = result is not None
        if not cached:
            result = checkpoint_metrics(ckpt["path"], examples, task, settings, teacher_model)
            if store is not None:
                store.put(key, result)
        rows.append({"ref": ref, "step": ckpt["step"], "tokens": ckpt.get("tokens", 0), "domain": domain, **result})
        if tracker is not None:
            scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            tracker.log(ckpt["step"], scalars, prefix="eval")
        kl = f" reverse KL {result['reverse_kl']:.4f}" if "reverse_kl" in result else ""
        print(
            f"{ref} step {ckpt['step']}: accuracy {result['accuracy']:.3f} on {result['n']}, "
            f"NLL {result['nll']:.4f}{kl} ({time.perf_counter() - t0:.1f}s{', cached' if cached else ''})",
            file=sys.stderr,
            flush=True,
        )
    correct = pl.List(pl.Int8) if settings.k == 1 else pl.List(pl.Float64)  # 0/1, or the share of k correct
    lists = {"correct": correct, "nll_sum_per_prompt": pl.List(pl.Float64),
             "nll_tokens_per_prompt": pl.List(pl.Int64), "reward_per_prompt": pl.List(pl.Float64),
             "kl_sum_per_prompt": pl.List(pl.Float64), "kl_tokens_per_prompt": pl.List(pl.Int64)}  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"tokens": pl.Int64, **{k: v for k, v in lists.items() if k in rows[0]}})
