"""One straight training loop for every method: SFT, OPD, RLVR, mixtures, pretraining.

A method supplies ``batch(model, step)`` (demonstrations or scored rollouts, no gradient),
``loss(model, micro_batch)`` and ``stats``; everything else (micro-batching with gradient
accumulation, optimizer, schedule, precision, clipping, checkpoints, resume) is shared, so
differences in the weights come from the objective alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from opdgeom.dtensor import full_tensor
from opdgeom.hf_folder import NonFiniteError
from opdgeom.spec import TrainSettings
from opdgeom.train.checkpoint import (
    STATE_DIR,
    export_hf,
    load_trainer_state,
    read_meta,
    save_trainer_state,
)
from opdgeom.train.distributed import SINGLE, World

__all__ = ["NonFiniteError", "STATE_DIR", "log", "lr_lambda", "train"]


def lr_lambda(warmup: int, steps: int):
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one log per run, not one per rank
        print(msg, file=sys.stderr, flush=True)


def train(
    model,
    tokenizer,
    method,
    settings: TrainSettings,
    run_dir: str | Path,
    fingerprint: str,
    projection=None,
    world: World = SINGLE,
    watch=None,
) -> list[dict]:
    """Train ``model`` in place for ``settings.steps`` steps; return the checkpoint records.

    Resumes from ``run_dir/trainer_state/`` when it exists and its fingerprint matches (weights,
    optimizer, schedule, records). The data position and every random draw are pure functions of
    (seed, step), so a resumed run replays exactly what the uninterrupted run would have done;
    state a method carries across steps (a lagged behaviour copy) is saved with the rest.
    Each step's rows go through forward and backward in micro-batches of at most
    ``settings.micro_batch_tokens`` padded tokens; the method fixed the loss normalizer for the whole
    step, so the accumulated gradient is the whole batch's.
    ``projection`` (optional) constrains gradients after backward or weights after each update.
    ``watch`` (optional, ``train.watch.RunWatch``) gets every step's numbers (tracker, live geometry).
    Under torchrun (``world.size`` > 1) the model arrives sharded: every rank writes its shards of
    the trainer state (DCP), and the exported bf16 checkpoint is gathered tensor by tensor.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps, checkpoint_steps = settings.steps, settings.checkpoint_steps
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.warmup_steps, steps))
    records: list[dict] = []
    start, tokens_seen, wall_before = 0, 0, 0.0

    meta = read_meta(run_dir)
    if meta is not None and meta["fingerprint"] == fingerprint:
        load_trainer_state(run_dir, model, optimizer, method)  # each rank reads its own shards
        scheduler.load_state_dict(meta["scheduler"])
        start, tokens_seen, records, wall_before = meta["step"], meta["tokens"], meta["records"], meta["wall"]
        log(f"resuming from step {start} ({run_dir / STATE_DIR})")
    elif meta is not None:
        log(f"ignoring {run_dir / STATE_DIR}: it belongs to another configuration")
    if watch is not None:
        watch.resume(start)

    t_start = time.perf_counter()
    model.train()
    for step in range(start, steps):
        t0 = time.perf_counter()
        batch = method.batch(model, step)
        t_batch = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        groups = batch.micro_batches(settings.micro_batch_tokens, world)  # as many on every rank
        sums: dict[str, torch.Tensor] = defaultdict(float)
        for rows in groups:
            loss, micro_sums = method.loss(model, batch.select(rows))
            if not torch.isfinite(loss):
                raise NonFiniteError(f"step {step + 1}: loss is {loss.item()}; stopping before any checkpoint")
            loss.backward()
            for key, value in {"loss": loss.detach(), **micro_sums}.items():
                sums[key] = sums[key] + value
        stats = method.stats(batch, sums)
        if projection is not None:
            projection.after_backward(model)  # project first, so clipping sees the applied gradient
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
        if not torch.isfinite(grad_norm):
            raise NonFiniteError(f"step {step + 1}: gradient norm is {grad_norm.item()}; stopping")
        optimizer.step()
        scheduler.step()
        if projection is not None:
            projection.after_update(model)
        tokens_seen += stats["trained_tokens"]
        t_step = time.perf_counter() - t0

        done = step + 1
        # Rollout throughput counts generated tokens over the batch phase (sampling + scoring);
        # update throughput counts trained tokens over the forward/backward/optimizer phase.
        rates = {"update_tok/s": stats["trained_tokens"] / (t_step - t_batch)}
        if "rollout_tokens" in stats:
            rates["rollout_tok/s"] = stats["rollout_tokens"] / t_batch
        if watch is not None:
            numbers = {**stats, "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0], **rates}
            watch.step(model, done, numbers, t_step)
        if done % max(1, steps // 20) == 0 or done == steps or done == start + 1:
            elapsed = time.perf_counter() - t_start
            eta = elapsed / (done - start) * (steps - done)
            extras = " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k not in ("trained_tokens",))
            micro = f"micro_batches={len(groups)} " if len(groups) > 1 else ""
            rollout = f"rollout_tok/s={rates['rollout_tok/s']:.0f} " if "rollout_tok/s" in rates else ""
            log(
                f"step {done}/{steps} {extras} grad_norm={grad_norm.item():.3g} {micro}{rollout}"
                f"update_tok/s={rates['update_tok/s']:.0f} "
                f"batch_s={t_batch:.2f} step_s={t_step:.2f} eta={eta:.0f}s"
            )

        if done in checkpoint_steps:
            ckpt_dir = run_dir / f"step_{done:06d}"
            wall = wall_before + time.perf_counter() - t_start
            record = {
                "step": done,
                "path": ckpt_dir.name,
                "tokens": tokens_seen,
                "loss": stats["loss"],
                "wall_time": wall,
            }
            records.append(record)
            try:
                export_hf(model, tokenizer, ckpt_dir, world)  # collective: every rank gathers, rank 0 writes
            except NonFiniteError as err:
                raise NonFiniteError(f"step {done}: {err}") from None
            meta = {"fingerprint": fingerprint, "step": done, "tokens": tokens_seen, "records": records, "wall": wall}
            save_trainer_state(run_dir, model, optimizer, method, {**meta, "scheduler": scheduler.state_dict()}, world)
            if watch is not None:
                watch.checkpoint()
    return records
