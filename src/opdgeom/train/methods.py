"""Methods: how a step's batch is made and scored. SFT trains on demonstrations; every
policy-gradient method (OPD, RLVR, mixtures) shares one rollout path and one loss and differs only
in its advantage function."""

from __future__ import annotations

import torch

from opdgeom.rollout import HFEngine
from opdgeom.train.batches import encode_completion, encode_prompt, epoch_batch_indices, pack
from opdgeom.train.behaviour import OnPolicy
from opdgeom.train.distributed import SINGLE, World, global_sum, local_rows
from opdgeom.train.objectives import (
    grpo_advantages,
    mix_advantages,
    opd_advantages,
    pg_loss,
    select_tokens,
    sft_loss,
    token_logprobs,
)


def _normalizer(mask_BT: torch.Tensor, world: World) -> torch.Tensor:
    """Global kept-token count / W: each rank's loss is its share of the global token mean, scaled
    by W because FSDP averages gradients over ranks (with one process: the local count)."""
    return global_sum(mask_BT.sum(), world).to(mask_BT.device) / world.size


def _global_mean(value: torch.Tensor, world: World) -> float:
    return (global_sum(value.detach(), world) / world.size).item()


class SFTMethod:
    """Token NLL on the completions of demonstrations (prompt tokens are not trained)."""

    def __init__(self, tokenizer, examples, batch_size: int, seed: int, world: World = SINGLE):
        self.tokenizer = tokenizer
        self.pairs = [
            (encode_prompt(tokenizer, e.prompt), encode_completion(tokenizer, e.completion)) for e in examples
        ]
        self.batch_size = batch_size
        self.seed = seed
        self.world = world

    def batch(self, model, step: int) -> dict:
        indices = local_rows(epoch_batch_indices(len(self.pairs), self.batch_size, step, self.seed), self.world)
        prompts, completions = zip(*(self.pairs[i] for i in indices))
        batch = pack(list(prompts), list(completions), self.tokenizer.pad_token_id)
        return {k: v.to(self.world.device) for k, v in batch.items()}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logp_BT = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        mask_BT = batch["target_mask"]
        loss = sft_loss(logp_BT, mask_BT, _normalizer(mask_BT, self.world))
        trained = int(global_sum(mask_BT.sum(), self.world))
        return loss, {"loss": _global_mean(loss, self.world), "trained_tokens": trained}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PolicyGradientMethod:
    """Sample G completions per prompt, score them, turn scores into per-token advantages.

    ``advantage`` selects the method: "opd" (teacher reverse KL per token), "rlvr" (GRPO on the
    verifier's reward) or "mix" (alpha * OPD + (1 - alpha) * RLVR). ``behaviour`` says who samples
    (on-policy by default). ``token_mask`` = {"select": "top"|"random", "keep": f} trains on a
    fraction f of the completion tokens, chosen by largest per-token reverse KL or at random.
    """

    def __init__(
        self, tokenizer, examples, task, settings: dict, seed: int, advantage: str,
        teacher=None, behaviour=None, token_mask: dict | None = None, alpha: float | None = None,
        world: World = SINGLE, engine=None,
    ):  # fmt: skip
        if advantage in ("opd", "mix") and teacher is None:
            raise ValueError(f"method {advantage!r} needs a teacher model")
        if advantage == "mix" and alpha is None:
            raise ValueError("method 'mix' needs alpha (A = alpha * A_OPD + (1 - alpha) * A_RLVR)")
        if token_mask and advantage == "rlvr" and token_mask["select"] == "top":
            raise ValueError("top-KL token selection needs a teacher (method opd or mix)")
        self.tokenizer = tokenizer
        self.examples = examples
        self.prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
        self.task = task
        self.teacher = teacher
        self.settings = settings
        self.seed = seed
        self.advantage = advantage
        self.behaviour = behaviour or OnPolicy()
        self.token_mask = token_mask
        self.alpha = alpha
        self.world = world
        self.engine = engine  # None: transformers generate on the sampler itself

    def state_dict(self) -> dict:
        return self.behaviour.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.behaviour.load_state_dict(state)

    @torch.no_grad()
    def batch(self, model, step: int) -> dict:
        s = self.settings
        group = s["group_size"]
        indices = local_rows(epoch_batch_indices(len(self.prompts), s["batch_size"], step, self.seed), self.world)
        rows = [i for i in indices for _ in range(group)]  # G consecutive rows per prompt
        sampler = self.behaviour.sampler(model, step)
        if self.engine is None:
            # Ranks sample different prompts from different streams; under FSDP every rank must run
            # the same number of forward passes, which synced generation guarantees.
            engine = HFEngine(sampler, self.tokenizer, synced=self.world.size > 1)
        else:
            engine = self.engine
            engine.sync_weights(sampler)  # the engine samples from the current behaviour weights
        rollouts = engine.sample(
            [self.prompts[i] for i in rows],
            s["max_new_tokens"],
            s["temperature"],
            seed=(self.seed * 7919 + step) * self.world.size + self.world.rank,
        )
        batch = pack(rollouts.prompt_ids, rollouts.completion_ids, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.world.device) for k, v in batch.items()}
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        rewards = [self.task.verify(t, self.examples[i].answer) for t, i in zip(texts, rows)]
        batch["rewards_B"] = torch.tensor(rewards, device=self.world.device)
        batch["rollout_tokens"] = sum(len(c) for c in rollouts.completion_ids)
        batch["step"] = step
        if not self.behaviour.on_policy:
            batch["behaviour_logp_BT"] = token_logprobs(sampler, batch["input_ids"], batch["attention_mask"])
        if self.teacher is not None:
            batch["teacher_logp_BT"] = token_logprobs(self.teacher, batch["input_ids"], batch["attention_mask"])
        return batch

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        mask_BT = batch["target_mask"]
        logp_BT = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        # On-policy the sampler is the current policy: rho = exp(logp - logp.detach()) = 1 exactly.
        behaviour_logp_BT = batch.get("behaviour_logp_BT", logp_BT.detach())
        stats = {"reward": _global_mean(batch["rewards_B"].mean(), self.world)}
        if self.advantage in ("opd", "mix"):
            # The current student's log-prob (not the sampler's): with rho this is an importance-
            # weighted estimate of the current policy's reverse-KL gradient, also off-policy.
            a_opd_BT = opd_advantages(logp_BT.detach(), batch["teacher_logp_BT"])
            stats["reverse_kl"] = _global_mean(-(a_opd_BT * mask_BT).sum() / mask_BT.sum(), self.world)
        if self.advantage in ("rlvr", "mix"):
            a_rlvr_B = grpo_advantages(batch["rewards_B"], self.settings["group_size"])
        if self.advantage == "opd":
            adv_BT = a_opd_BT
        elif self.advantage == "rlvr":
            adv_BT = a_rlvr_B.unsqueeze(1).expand_as(mask_BT)
        else:
            alpha = self.alpha
            adv_BT = mix_advantages(a_opd_BT, a_rlvr_B, alpha)
            stats["adv_scale_opd"] = ((alpha * a_opd_BT).abs() * mask_BT).sum().item() / mask_BT.sum().item()
            stats["adv_scale_rlvr"] = ((1 - alpha) * a_rlvr_B.abs().mean()).item()
        if self.token_mask:
            # Under data parallelism the selection is per rank (top-KL over the rank's own tokens).
            generator = torch.Generator().manual_seed(
                (self.seed * 104_729 + batch["step"]) * self.world.size + self.world.rank
            )
            scores_BT = -a_opd_BT if self.token_mask["select"] == "top" else mask_BT
            mask_BT = select_tokens(scores_BT, mask_BT, self.token_mask["keep"], self.token_mask["select"], generator)
        loss = pg_loss(
            logp_BT, behaviour_logp_BT, adv_BT, mask_BT, self.settings.get("rho_clip"), _normalizer(mask_BT, self.world)
        )
        stats.update(
            loss=_global_mean(loss, self.world),
            trained_tokens=int(global_sum(mask_BT.sum(), self.world)),
            rollout_tokens=batch["rollout_tokens"],
        )
        if not self.behaviour.on_policy:
            stats["rho_mean"] = (
                (logp_BT.detach() - behaviour_logp_BT).exp() * mask_BT
            ).sum().item() / mask_BT.sum().item()
        return loss, stats
