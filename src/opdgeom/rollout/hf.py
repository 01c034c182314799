"""The default engine: the training model itself decodes (no weight copy), one token at a time over a
transformers KV cache.

The decode loop is transformers ``generate``'s sampling loop written out, because what ``generate``
adds on top costs more than the forward itself at the tiny study's sizes (input preparation, stopping
criteria, kwargs updates: ~20% of a rollout) and because a group's G rows share one prompt: each
distinct prompt is prefilled once and its cache rows copied G times. Same draws as ``generate``: the
global RNG (seeded per call), softmax of the float32 last-position logits through transformers' own
temperature and top-p warpers, ``multinomial`` on every row every step (finished rows included, then
replaced by the pad), positions counted from a row's first real token, EOS ending a row;
``tests/test_sampling_hf.py`` compares the two token for token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from opdgeom.rollout.base import Rollouts, SamplingEngine
from opdgeom.tokens import left_pad


class HFEngine(SamplingEngine):
    def __init__(self, model, tokenizer, batch_size: int = 256, synced: bool = False):
        """``synced``: keep stepping until every rank is done (FSDP needs matching forward calls)."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.synced = synced

    def sample(self, prompt_ids, max_new_tokens, temperature, seed, top_p: float = 1.0) -> Rollouts:
        """``top_p`` < 1: nucleus sampling (evaluation's avg@k decoding); training samples the full
        distribution (1.0). Temperature 0: greedy."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        seed_global_rng(seed, device)  # rollouts are replayable: the same seed gives the same tokens
        completions: list[list[int]] = []
        # inference_mode skips autograd's version counters and view tracking (~10% of a tiny decode step);
        # not on an FSDP2 model (one rank or many), whose parameters are re-pointed at all-gathered buffers
        # that later forwards with gradients reuse.
        from torch.distributed.fsdp import FSDPModule

        with torch.inference_mode(not isinstance(self.model, FSDPModule)), torch.no_grad():
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = [list(p) for p in prompt_ids[start : start + self.batch_size]]
                completions += self._decode(chunk, max_new_tokens, temperature, top_p, device)
        self.model.train(was_training)
        return Rollouts(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions)

    def _decode(self, prompts, max_new_tokens, temperature, top_p, device) -> list[list[int]]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        distinct = {tuple(p): None for p in prompts}  # first-seen order
        row_of = {p: i for i, p in enumerate(distinct)}
        index_B = torch.tensor([row_of[tuple(p)] for p in prompts], device=device)
        ids_UT, mask_UT = (t.to(device) for t in left_pad([list(p) for p in distinct], pad))
        # generate's positions: from a row's first real token (left padding), pads at 0
        pos_UT = (mask_UT.cumsum(-1) - 1).masked_fill(mask_UT == 0, 0)
        out = self.model(
            input_ids=ids_UT, attention_mask=mask_UT, position_ids=pos_UT, use_cache=True, logits_to_keep=1
        )
        cache = out.past_key_values
        if len(distinct) < len(prompts):  # each row its own copy of its prompt's keys and values
            cache.batch_select_indices(index_B)
        logits_BV = out.logits[:, -1].float()[index_B]
        del out
        mask_BT, pos_B1 = mask_UT[index_B], pos_UT[index_B, -1:]
        warpers = []
        if temperature > 0 and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if temperature > 0 and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        alive_B = torch.ones(len(prompts), dtype=torch.bool, device=device)
        ones_B1 = torch.ones_like(mask_BT[:, :1])
        tokens: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            if temperature > 0:
                for warp in warpers:
                    logits_BV = warp(None, logits_BV)
                next_B = torch.multinomial(torch.softmax(logits_BV, dim=-1), num_samples=1).squeeze(1)
            else:
                next_B = logits_BV.argmax(dim=-1)
            next_B = torch.where(alive_B, next_B, pad)
            tokens.append(next_B)
            alive_B &= next_B != eos
            if t + 1 == max_new_tokens or self._all_done(alive_B):
                break
            mask_BT, pos_B1 = torch.cat([mask_BT, ones_B1], dim=1), pos_B1 + 1
            step = self.model(
                input_ids=next_B[:, None], attention_mask=mask_BT, position_ids=pos_B1,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            logits_BV = step.logits[:, -1].float()
        completions = []
        for row in torch.stack(tokens, dim=1).tolist():
            completions.append(row[: row.index(eos) + 1] if eos in row else row)
        return completions

    def _all_done(self, alive_B: torch.Tensor) -> bool:
        """Every row has ended; under FSDP every rank's rows (each step is a collective forward)."""
        busy = alive_B.any().to(torch.int32)
        if self.synced:
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        return not bool(busy)


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the generator the draws come from. On the CPU only the CPU's: ``torch.manual_seed`` also
    queues a seed for every CUDA device, and on a machine without CUDA each queued call records a
    traceback (~3 ms, twenty times a run)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)
