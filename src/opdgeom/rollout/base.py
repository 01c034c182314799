"""The sampling-engine interface every rollout backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class Rollouts:
    """Completions for a list of prompts: token ids (eos included when the model stopped)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]


class SamplingEngine(ABC):
    """Samples completions from a policy (scoring given tokens is an engine's own extra, e.g. VLLMEngine.score)."""

    @abstractmethod
    def sample(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, seed: int) -> Rollouts:
        """One completion per prompt; temperature 0 means greedy."""

    def sync_weights(self, model) -> None:
        """Bring the engine's copy of the policy up to date with ``model`` (no-op when shared)."""
