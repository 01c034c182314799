"""Behaviour policies: who samples the rollouts of a policy-gradient step.

On-policy, the sampler is the model being trained (rho = 1). Off-policy controls sample from a
frozen model (the SFT anchor) or from a lagged copy of the policy refreshed every ``lag`` steps;
the loss then corrects with rho = exp(log pi_theta - log pi_behaviour).
"""

from __future__ import annotations

import copy
from collections.abc import Callable


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


class LaggedPolicy:
    """A copy of the policy, refreshed at steps 0, lag, 2*lag, ...: rollouts are up to lag-1 steps stale.

    The copy is a plain (unsharded) model on ``device`` on every rank; ``full_state`` gives the
    policy's whole weights (gathered from every rank when the policy is FSDP-sharded). Its
    weights are part of the trainer state, so a resumed run samples from the same stale copy.
    """

    on_policy = False

    def __init__(self, model, lag: int, device, full_state: Callable):
        self.lag = lag
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.full_state = full_state
        self.refreshed_at: int | None = None

    def sampler(self, model, step: int):
        due = step - step % self.lag
        if self.refreshed_at != due:
            self.model.load_state_dict(self.full_state(model))
            self.refreshed_at = due
        return self.model

    def state_dict(self) -> dict:
        return {"refreshed_at": self.refreshed_at, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.refreshed_at = state["refreshed_at"]
