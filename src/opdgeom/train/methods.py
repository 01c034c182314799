"""Methods: how a step's batch is made and scored. SFT trains on demonstrations; every
policy-gradient method (OPD, RLVR, mixtures) shares one rollout path and one loss and differs only
in its advantage function.

A method's ``batch(model, step)`` builds the whole step without gradients (sampling, rewards,
teacher and behaviour log-probs, token selection, the loss normalizer); ``loss(model, micro)`` is
one forward pass with gradients over a micro-batch of it. The loop sums the micro-batch losses, so
anything that couples rows of a step (GRPO groups, top-KL selection, the token count) is settled in
``batch`` first. ``stats(batch, sums)`` turns the summed per-micro-batch quantities into the log line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opdgeom.logprobs import token_logprobs
from opdgeom.rollout import HFEngine
from opdgeom.rollout.colocate import behaviour_version
from opdgeom.spec import METHODS_NEEDING_TEACHER, METHODS_USING_REWARD, RunSpec, TrainSettings
from opdgeom.tokens import encode_completion, encode_prompt, pack
from opdgeom.train.batches import TokenBatch, epoch_batch_indices, score
from opdgeom.train.behaviour import OnPolicy
from opdgeom.train.distributed import SINGLE, World, global_sum, local_rows
from opdgeom.train.objectives import (
    grpo_advantages,
    mix_advantages,
    opd_advantages,
    pg_loss,
    select_tokens,
    sft_loss,
)


def _normalizer(mask_BT: torch.Tensor, world: World) -> torch.Tensor:
    """Global kept-token count / W: each rank's loss is its share of the global token mean, scaled
    by W because FSDP averages gradients over ranks (with one process: the local count)."""
    return global_sum(mask_BT.sum(), world).to(mask_BT.device) / world.size


def _global_mean(value: torch.Tensor | float, world: World) -> float:
    value = torch.as_tensor(value, dtype=torch.float64, device=world.device)
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

    def batch(self, model, step: int) -> TokenBatch:
        indices = local_rows(epoch_batch_indices(len(self.pairs), self.batch_size, step, self.seed), self.world)
        prompts, completions = zip(*(self.pairs[i] for i in indices))
        rows = {
            k: v.to(self.world.device)
            for k, v in pack(list(prompts), list(completions), self.tokenizer.pad_token_id).items()
        }
        mask_BT = rows["target_mask"]
        return TokenBatch(rows["input_ids"], rows["attention_mask"], mask_BT, _normalizer(mask_BT, self.world))

    def loss(self, model, micro: TokenBatch) -> tuple[torch.Tensor, dict]:
        logp_BT = token_logprobs(
            model, micro.input_ids_BT, micro.attention_mask_BT, positions_BT=micro.target_mask_BT.bool()
        )
        return sft_loss(logp_BT, micro.target_mask_BT, micro.normalizer), {}

    def stats(self, batch: TokenBatch, sums: dict) -> dict:
        trained = int(global_sum(batch.target_mask_BT.sum(), self.world))
        return {"loss": _global_mean(sums["loss"], self.world), "trained_tokens": trained}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PolicyGradientMethod:
    """Sample G completions per prompt, score them, turn scores into per-token advantages.

    ``run.method`` selects the advantage: "opd" (teacher reverse KL per token), "rlvr" (GRPO on the
    verifier's reward) or "mix" (alpha * OPD + (1 - alpha) * RLVR). ``behaviour`` says who samples
    (on-policy by default). ``run.token_mask`` trains on a fraction of the completion tokens, chosen
    by largest per-token reverse KL or at random. ``teacher`` (a TeacherScorer) gives log pi_teacher
    of the sampled tokens at the batch's positions, whatever holds the teacher and its prompt format.
    """

    def __init__(
        self,
        tokenizer,
        examples,
        task,
        run: RunSpec,
        seed: int,
        teacher: Callable[..., torch.Tensor] | None = None,
        behaviour=None,
        world: World = SINGLE,
        engine=None,
    ):
        if run.method in METHODS_NEEDING_TEACHER and teacher is None:
            raise ValueError(f"method {run.method!r} needs a teacher model")
        if run.method == "mix" and run.alpha is None:
            raise ValueError("method 'mix' needs alpha (A = alpha * A_OPD + (1 - alpha) * A_RLVR)")
        if run.token_mask and run.method == "rlvr" and run.token_mask.select == "top":
            raise ValueError("top-KL token selection needs a teacher (method opd or mix)")
        self.tokenizer = tokenizer
        self.examples = examples
        self.prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
        self.task = task
        self.teacher = teacher
        self.settings: TrainSettings = run.train
        self.seed = seed
        self.advantage = run.method
        self.alpha = run.alpha
        self.token_mask = run.token_mask
        self.behaviour = behaviour or OnPolicy()
        self.world = world
        self.engine = engine  # None: transformers generate on the sampler itself

    def state_dict(self) -> dict:
        return self.behaviour.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.behaviour.load_state_dict(state)

    @property
    def uses_teacher(self) -> bool:
        return self.advantage in METHODS_NEEDING_TEACHER

    @torch.no_grad()
    def batch(self, model, step: int) -> TokenBatch:
        s, world = self.settings, self.world
        indices = local_rows(epoch_batch_indices(len(self.prompts), s.batch_size, step, self.seed), world)
        rows = [i for i in indices for _ in range(s.group_size)]  # G consecutive rows per prompt
        sampler = self.behaviour.sampler(model, step)
        if self.engine is None:
            # Ranks sample different prompts from different streams; under FSDP every rank must run
            # the same number of forward passes, which synced generation guarantees.
            engine = HFEngine(sampler, self.tokenizer, synced=world.size > 1)
        else:
            # This rank's colocated vLLM engine: re-synced (from the shards, bucket by bucket) only
            # when the behaviour's weights changed since it last took them; asleep after sampling.
            engine = self.engine
            engine.prepare(sampler, behaviour_version(self.behaviour, step), check_ids=self.prompts[0])
        rollouts = engine.sample(
            [self.prompts[i] for i in rows],
            s.max_new_tokens,
            s.temperature,
            seed=(self.seed * 7919 + step) * world.size + world.rank,
        )
        if self.engine is not None:
            self.engine.release()
        packed = {
            k: v.to(world.device)
            for k, v in pack(rollouts.prompt_ids, rollouts.completion_ids, self.tokenizer.pad_token_id).items()
        }
        completion_mask_BT = packed["target_mask"]
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        rewards_B = torch.tensor(
            self.task.verify_many(texts, [self.examples[i].answer for i in rows]), device=world.device
        )
        batch = TokenBatch(packed["input_ids"], packed["attention_mask"], completion_mask_BT, torch.tensor(0.0))
        batch.extra = {"completion_mask_BT": completion_mask_BT, "rewards_B": rewards_B}
        batch.extra["rollout_tokens_B"] = torch.tensor([len(c) for c in rollouts.completion_ids], device=world.device)
        if not self.behaviour.on_policy:
            batch.extra["behaviour_logp_BT"] = score(sampler, batch, s.micro_batch_tokens, world)
        if self.uses_teacher:
            prompts = [self.examples[i].prompt for i in rows]
            batch.extra["teacher_logp_BT"] = self.teacher(prompts, rollouts.prompt_ids, rollouts.completion_ids, batch)
        if self.advantage in METHODS_USING_REWARD:
            batch.extra["seq_advantage_B"] = grpo_advantages(rewards_B, s.group_size)
        if self.token_mask:
            batch.target_mask_BT = self._select_tokens(model, batch, step)
        batch.normalizer = _normalizer(batch.target_mask_BT, world)
        return batch

    def _select_tokens(self, model, batch: TokenBatch, step: int) -> torch.Tensor:
        """Top-KL ranks the step's tokens by the current student's reverse KL to the teacher (a scoring
        pass over the whole step); random keeps the same number of tokens, uniformly. Under data
        parallelism the selection is per rank (over the rank's own tokens)."""
        world, mask_BT = self.world, batch.target_mask_BT
        generator = torch.Generator().manual_seed((self.seed * 104_729 + step) * world.size + world.rank)
        if self.token_mask.select == "top":
            policy_logp_BT = score(model, batch, self.settings.micro_batch_tokens, world)
            scores_BT = -opd_advantages(policy_logp_BT, batch.extra["teacher_logp_BT"])
        else:
            scores_BT = mask_BT
        return select_tokens(scores_BT, mask_BT, self.token_mask.keep, self.token_mask.select, generator)

    def loss(self, model, micro: TokenBatch) -> tuple[torch.Tensor, dict]:
        kept_BT, extra = micro.target_mask_BT, micro.extra
        # Only the completion is read (advantages, ratios, the loss): the prompt's positions are not scored.
        positions_BT = extra["completion_mask_BT"].bool()
        logp_BT = token_logprobs(model, micro.input_ids_BT, micro.attention_mask_BT, positions_BT=positions_BT)
        # On-policy the sampler is the current policy: rho = exp(logp - logp.detach()) = 1 exactly.
        behaviour_logp_BT = extra.get("behaviour_logp_BT", logp_BT.detach())
        sums = {}
        if self.uses_teacher:
            # The current student's log-prob (not the sampler's): with rho this is an importance-
            # weighted estimate of the current policy's reverse-KL gradient, also off-policy.
            a_opd_BT = opd_advantages(logp_BT.detach(), extra["teacher_logp_BT"])
            completion_BT = extra["completion_mask_BT"]
            sums["reverse_kl"] = -(a_opd_BT * completion_BT).sum()
            sums["adv_abs_opd"] = (a_opd_BT.abs() * completion_BT).sum()
        if self.advantage == "opd":
            adv_BT = a_opd_BT
        elif self.advantage == "rlvr":
            adv_BT = extra["seq_advantage_B"].unsqueeze(1).expand_as(kept_BT)
        else:
            adv_BT = mix_advantages(a_opd_BT, extra["seq_advantage_B"], self.alpha)
        if not self.behaviour.on_policy:
            sums["rho"] = ((logp_BT.detach() - behaviour_logp_BT).exp() * kept_BT).sum()
        loss = pg_loss(logp_BT, behaviour_logp_BT, adv_BT, kept_BT, self.settings.rho_clip, micro.normalizer)
        return loss, sums

    def stats(self, batch: TokenBatch, sums: dict) -> dict:
        world, extra = self.world, batch.extra
        completion = batch.extra["completion_mask_BT"].sum()
        stats = {"reward": _global_mean(extra["rewards_B"].float().mean(), world)}
        if self.uses_teacher:
            stats["reverse_kl"] = _global_mean(sums["reverse_kl"] / completion, world)
        if self.advantage == "mix":
            stats["adv_scale_opd"] = self.alpha * (sums["adv_abs_opd"] / completion).item()
            stats["adv_scale_rlvr"] = (1 - self.alpha) * extra["seq_advantage_B"].abs().mean().item()
        stats["loss"] = _global_mean(sums["loss"], world)
        stats["trained_tokens"] = int(global_sum(batch.target_mask_BT.sum(), world))
        stats["rollout_tokens"] = int(extra["rollout_tokens_B"].sum())
        if not self.behaviour.on_policy:
            stats["rho_mean"] = (sums["rho"] / batch.target_mask_BT.sum()).item()
        return stats
