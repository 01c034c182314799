"""The default engine: transformers ``generate`` on the training model itself (no weight copy)."""

from __future__ import annotations

import torch

from opdgeom.rollout.base import Rollouts, SamplingEngine
from opdgeom.tokens import left_pad


class HFEngine(SamplingEngine):
    def __init__(self, model, tokenizer, batch_size: int = 256, synced: bool = False):
        """``synced``: keep generating until every rank is done (FSDP needs matching forward calls)."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.synced = synced

    @torch.no_grad()
    def sample(self, prompt_ids, max_new_tokens, temperature, seed, top_p: float = 1.0) -> Rollouts:
        """``top_p`` < 1: nucleus sampling (evaluation's avg@k decoding); training samples the full
        distribution (1.0)."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        torch.manual_seed(seed)  # generate draws from the global RNG; seeding makes rollouts replayable
        completions: list[list[int]] = []
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start : start + self.batch_size]
            ids_BT, mask_BT = left_pad(chunk, self.tokenizer.pad_token_id)
            out_BS = self.model.generate(
                input_ids=ids_BT.to(device),
                attention_mask=mask_BT.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0 if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos,
                synced_gpus=self.synced,
            )
            for row in out_BS[:, ids_BT.shape[1] :].tolist():
                completions.append(row[: row.index(eos) + 1] if eos in row else row)
        self.model.train(was_training)
        return Rollouts(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions)
