"""Methods: how a step's batch is made and scored. SFT trains on demonstrations; every
policy-gradient method (OPD, RLVR, mixtures) shares one rollout path and one loss and differs only
in its advantage function."""

from __future__ import annotations

import torch

from opdgeom.train.batches import encode_completion, encode_prompt, epoch_batch_indices, pack
from opdgeom.train.objectives import (
    grpo_advantages,
    mix_advantages,
    opd_advantages,
    pg_loss,
    sft_loss,
    token_logprobs,
)


class SFTMethod:
    """Token NLL on the completions of demonstrations (prompt tokens are not trained)."""

    def __init__(self, tokenizer, examples, batch_size: int, seed: int):
        self.tokenizer = tokenizer
        self.pairs = [(encode_prompt(tokenizer, e.prompt), encode_completion(tokenizer, e.completion)) for e in examples]
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, model, step: int) -> dict:
        indices = epoch_batch_indices(len(self.pairs), self.batch_size, step, self.seed)
        prompts, completions = zip(*(self.pairs[i] for i in indices))
        return pack(list(prompts), list(completions), self.tokenizer.pad_token_id)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logp_BT = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = sft_loss(logp_BT, batch["target_mask"])
        return loss, {"loss": loss.item(), "trained_tokens": int(batch["target_mask"].sum())}


class PolicyGradientMethod:
    """Sample G completions per prompt, score them, turn scores into per-token advantages.

    ``advantage`` selects the method: "opd" (teacher reverse KL per token), "rlvr" (GRPO on the
    verifier's reward) or "mix" (alpha * OPD + (1 - alpha) * RLVR).
    """

    def __init__(self, tokenizer, examples, task, engine, settings: dict, seed: int, advantage: str, teacher=None):
        if advantage in ("opd", "mix") and teacher is None:
            raise ValueError(f"method {advantage!r} needs a teacher model")
        self.tokenizer = tokenizer
        self.examples = examples
        self.prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
        self.task = task
        self.engine = engine
        self.teacher = teacher
        self.settings = settings
        self.seed = seed
        self.advantage = advantage

    def batch(self, model, step: int) -> dict:
        s = self.settings
        group = s["group_size"]
        indices = epoch_batch_indices(len(self.prompts), s["batch_size"], step, self.seed)
        rows = [i for i in indices for _ in range(group)]  # G consecutive rows per prompt
        rollouts = self.engine.sample(
            [self.prompts[i] for i in rows], s["max_new_tokens"], s["temperature"], seed=self.seed * 7919 + step
        )
        batch = pack(rollouts.prompt_ids, rollouts.completion_ids, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        batch["rewards_B"] = torch.tensor([self.task.verify(t, self.examples[i].answer) for t, i in zip(texts, rows)])
        batch["rollout_tokens"] = sum(len(c) for c in rollouts.completion_ids)
        if self.teacher is not None:
            with torch.no_grad():
                batch["teacher_logp_BT"] = token_logprobs(self.teacher, batch["input_ids"], batch["attention_mask"])
        return batch

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        mask_BT = batch["target_mask"]
        logp_BT = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        behaviour_logp_BT = logp_BT.detach()  # on-policy: the sampler is the current policy, rho = 1
        stats = {"reward": batch["rewards_B"].mean().item()}
        if self.advantage in ("opd", "mix"):
            a_opd_BT = opd_advantages(behaviour_logp_BT, batch["teacher_logp_BT"])
            stats["reverse_kl"] = (-(a_opd_BT * mask_BT).sum() / mask_BT.sum()).item()
        if self.advantage in ("rlvr", "mix"):
            a_rlvr_B = grpo_advantages(batch["rewards_B"], self.settings["group_size"])
        if self.advantage == "opd":
            adv_BT = a_opd_BT
        elif self.advantage == "rlvr":
            adv_BT = a_rlvr_B.unsqueeze(1).expand_as(mask_BT)
        else:
            alpha = self.settings["alpha"]
            adv_BT = mix_advantages(a_opd_BT, a_rlvr_B, alpha)
            stats["adv_scale_opd"] = (alpha * a_opd_BT * mask_BT).abs().sum().item() / mask_BT.sum().item()
            stats["adv_scale_rlvr"] = ((1 - alpha) * a_rlvr_B.abs().mean()).item()
        loss = pg_loss(logp_BT, behaviour_logp_BT, adv_BT, mask_BT, clip=self.settings.get("rho_clip"))
        stats.update(loss=loss.item(), trained_tokens=int(mask_BT.sum()), rollout_tokens=batch["rollout_tokens"])
        return loss, stats
