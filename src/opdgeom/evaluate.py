"""Accuracy of checkpoints on the held-out split: greedy decoding, the domain's verifier."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import polars as pl

from opdgeom.device import local_device
from opdgeom.models import load_model, load_tokenizer
from opdgeom.rollout import HFEngine
from opdgeom.tasks import get_task
from opdgeom.tasks.files import read_jsonl
from opdgeom.tokens import encode_prompt


def accuracy(model_dir: str | Path, examples, task, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy accuracy of one checkpoint; also the mean completion length in tokens."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device=local_device()).eval()
    engine = HFEngine(model, tokenizer, batch_size=batch_size)
    rollouts = engine.sample([encode_prompt(tokenizer, e.prompt) for e in examples], max_new_tokens, 0.0, seed=0)
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    rewards = [task.verify(text, e.answer) for text, e in zip(texts, examples)]
    return {
        "accuracy": sum(rewards) / len(rewards),
        "n": len(rewards),
        "mean_completion_tokens": sum(map(len, rollouts.completion_ids)) / len(rewards),
    }


def evaluate_checkpoints(
    ref: str, checkpoints: list[dict], eval_data: str | Path, domain: str, max_new_tokens: int, batch_size: int
) -> pl.DataFrame:
    """One row per checkpoint: (ref, step, tokens, domain, accuracy, n, mean_completion_tokens)."""
    examples = read_jsonl(eval_data)
    task = get_task(domain)
    rows = []
    for ckpt in checkpoints:
        t0 = time.perf_counter()
        result = accuracy(ckpt["path"], examples, task, max_new_tokens, batch_size)
        rows.append({"ref": ref, "step": ckpt["step"], "tokens": ckpt.get("tokens", 0), "domain": domain, **result})
        print(
            f"{ref} step {ckpt['step']}: accuracy {result['accuracy']:.3f} on {result['n']} "
            f"({time.perf_counter() - t0:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    return pl.DataFrame(rows, schema_overrides={"tokens": pl.Int64})
