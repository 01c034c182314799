"""Teacher scoring for OPD: log pi_teacher(y_t) of every token the student sampled.

A base student (Qwen3-8B-Base) and an instruct teacher (Qwen3-32B) share a vocabulary but not a
prompt format: the student reads the task as raw text and ends its answer with its EOS
(``<|endoftext|>``); the teacher expects its chat template and ends an assistant turn with its own
EOS (``<|im_end|>``). The teacher therefore scores each completion after its own prompt, with the
student's final EOS read as the teacher's, and the scores are put back at the student's positions:
the same tokens, each judged in the format the teacher was trained on. A teacher in the student's
format (the tiny families) scores the student's rows as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdgeom.models import load_tokenizer
from opdgeom.tokens import PromptFormat, pack
from opdgeom.train.batches import TokenBatch, score
from opdgeom.train.distributed import World

PROMPT_FORMATS = ("raw", "chat")


class TeacherScorer:
    def __init__(
        self,
        model,
        student_tokenizer,
        teacher_dir: Path,
        prompt_format: str,
        max_tokens: int | None,
        world: World,
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"teacher prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        teacher_tokenizer = load_tokenizer(teacher_dir)
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ValueError(
                f"{teacher_dir}: the teacher's tokenizer differs from the student's; OPD scores the student's "
                f"token ids under the teacher, so both must share one vocabulary"
            )
        if prompt_format == "chat" and not teacher_tokenizer.chat_template:
            raise ValueError(f"{teacher_dir}: prompt_format 'chat' but the teacher's tokenizer has no chat_template")
        self.model = model
        self.tokenizer = teacher_tokenizer
        self.format = PromptFormat(teacher_tokenizer, chat=prompt_format == "chat")
        self.student_stop = student_tokenizer.eos_token_id
        self.max_tokens = max_tokens
        self.world = world  # the ranks the teacher is sharded over

    @property
    def same_format(self) -> bool:
        return not self.format.chat and self.student_stop == self.tokenizer.eos_token_id

    def teacher_rows(self, prompts: list[str], completion_ids: list[list[int]]) -> tuple[list, list]:
        """(teacher prompt ids, completion ids with the student's final EOS as the teacher's)."""
        teacher_prompts = [self.format.prompt(text) for text in prompts]
        return teacher_prompts, [self.format.completion(c, self.student_stop) for c in completion_ids]

    @torch.no_grad()
    def __call__(self, prompts: list[str], prompt_ids, completion_ids, batch: TokenBatch) -> torch.Tensor:
        """(B, T-1) log-probs at the student batch's positions (zero outside the completions)."""
        if self.same_format:
            return score(self.model, batch, self.max_tokens, self.world)
        teacher_prompts, completions = self.teacher_rows(prompts, completion_ids)
        rows = {
            k: v.to(batch.input_ids_BT.device)
            for k, v in pack(teacher_prompts, completions, self.tokenizer.pad_token_id).items()
        }
        teacher_batch = TokenBatch(rows["input_ids"], rows["attention_mask"], rows["target_mask"], batch.normalizer)
        teacher_logp_BT = score(self.model, teacher_batch, self.max_tokens, self.world)
        out_BT = torch.zeros_like(batch.target_mask_BT, dtype=torch.float32)
        for i, (student_prompt, teacher_prompt, completion) in enumerate(zip(prompt_ids, teacher_prompts, completions)):
            s, t, n = len(student_prompt) - 1, len(teacher_prompt) - 1, len(completion)
            out_BT[i, s : s + n] = teacher_logp_BT[i, t : t + n]
        return out_BT
