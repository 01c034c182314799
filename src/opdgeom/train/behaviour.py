"""Behaviour policies: who samples the rollouts of a policy-gradient step.

On-policy, the sampler is the model being trained (rho = 1). Off-policy controls sample from a
frozen model (the SFT anchor) or from a lagged copy of the policy refreshed every ``lag`` steps;
the loss then corrects with rho = exp(log pi_theta - log pi_behaviour).
"""

from __future__ import annotations

import torch


class OnPolicy:
    on_policy = True

    def sampler(self, model, step: int):
        return model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FrozenPolicy:
    """A fixed model (e.g. the SFT anchor the run starts from)."""

    on_policy = False

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    def sampler(self, model, step: int):
        return self.model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def copy_weights(source, target) -> None:
    """target <- source, parameter by parameter. Under FSDP both are sharded the same way (dim 0
    over the same ranks), so each rank copies its own shard and nothing is gathered."""
    pairs = zip(source.named_parameters(), target.named_parameters(), strict=True)
    for (name, src), (target_name, dst) in pairs:
        src, dst = (t.to_local() if hasattr(t, "to_local") else t for t in (src, dst))
        if name != target_name or src.shape != dst.shape:
            raise ValueError(f"lagged copy: {target_name} {tuple(dst.shape)} does not match {name} {tuple(src.shape)}")
        dst.copy_(src)


class LaggedPolicy:
    """A copy of the policy, refreshed at steps 0, lag, 2*lag, ...: rollouts are up to lag-1 steps stale.

    ``copy`` is a frozen model of the policy's architecture, sharded like the policy under FSDP (and
    held in the frozen dtype); a refresh copies each rank's shards. Its weights are part of the
    trainer state, so a resumed run samples from the same stale copy.
    """

    on_policy = False

    def __init__(self, copy, lag: int):
        self.lag = lag
        self.model = copy.eval().requires_grad_(False)
        self.refreshed_at: int | None = None

    def sampler(self, model, step: int):
        due = step - step % self.lag
        if self.refreshed_at != due:
            copy_weights(model, self.model)
            self.refreshed_at = due
        return self.model

    def state_dict(self) -> dict:
        return {"refreshed_at": self.refreshed_at, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.refreshed_at = state["refreshed_at"]
