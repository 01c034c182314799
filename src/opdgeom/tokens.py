"""Token rows shared by training, rollouts and evaluation: encode examples, pad prompts for
generation, pack prompt+completion rows for scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (generation continues from the right edge)."""
    width = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids_BT[i, width - len(row) :] = torch.tensor(row)
            mask_BT[i, width - len(row) :] = 1
    return ids_BT, mask_BT


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows.

    ``target_mask_BT`` marks positions t whose *next* token (t+1) is a completion token, so that
    ``logits[:, :-1]`` scored against ``input_ids[:, 1:]`` lines up with it after a shift.
    """
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask_BT = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids_BT[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn_BT[i, : len(p) + len(c)] = 1
        target_mask_BT[i, max(len(p) - 1, 0) : len(p) + len(c) - 1] = 1.0
    return {"input_ids": ids_BT, "attention_mask": attn_BT, "target_mask": target_mask_BT}


def chat_prompt(tokenizer, text: str) -> list[int]:
    """An instruct model's prompt: its own chat template around ``text`` as the user's turn, ready
    for the assistant's answer, thinking switched off (Qwen3 templates then emit an empty
    ``<think></think>`` block: no reasoning text precedes the answer the teacher scores)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@dataclass
class PromptFormat:
    """How a model reads a task prompt: raw text after BOS (base models, the tiny study) or its chat
    template with thinking off (an instruct teacher, ``prompt_format: chat`` in the family preset),
    and how it reads a completion another model (with its own EOS) sampled."""

    tokenizer: object
    chat: bool = False

    def prompt(self, text: str) -> list[int]:
        return chat_prompt(self.tokenizer, text) if self.chat else encode_prompt(self.tokenizer, text)

    def completion(self, ids: list[int], sampler_eos: int) -> list[int]:
        """The same tokens, a final EOS of the sampler read as this model's own."""
        own = self.tokenizer.eos_token_id
        return ids[:-1] + [own] if ids and ids[-1] == sampler_eos else list(ids)
