"""Real math data sets behind the task interface, for the cluster presets.

A real domain has no generator: its examples come from the hub (or a local JSONL mirror set with
OPDGEOM_DATA_<NAME> for air-gapped clusters). Its verifier is a reasoning model's: the last
``\\boxed{}`` answer (else the one after "####") checked for mathematical equivalence by math-verify,
with a per-answer time limit (``tasks.answers``); the synthetic domains keep their exact verifier.
"""

import os
import random

from opdgeom.tasks.answers import final_answer, verify_math
from opdgeom.tasks.base import Example, Task, take
from opdgeom.tasks.files import load_hf_dataset, load_jsonl_dataset

SOURCES = {
    # name: (hub data set, config, train split, eval split), or None: the family preset's sources only
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
    # Competition math with long chain-of-thought (the hub presets' study domain): demonstrations,
    # policy-gradient prompts and the held-out split come from the preset (tasks.roles).
    "competition_math": None,
}


class DatasetTask(Task):
    """A named real data set; ``load_splits`` replaces ``split`` for it."""

    def __init__(self, name: str):
        if name not in SOURCES:
            raise ValueError(f"unknown real data set {name!r}; known: {sorted(SOURCES)}")
        self.name = name

    @property
    def num_prompts(self) -> int:
        return 0

    def extract_answer(self, completion: str) -> str | None:
        return final_answer(completion)

    def verify(self, completion: str, answer: str) -> float:
        return verify_math(completion, answer)

    def sample(self, rng: random.Random) -> Example:
        raise TypeError(f"domain {self.name!r} is a real data set: it has examples, not a generator")

    def load_splits(self, n_train: int, n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
        """The first ``n_eval`` test examples, and ``n_train`` train examples shuffled by seed, from the
        domain's built-in location (a JSONL mirror in ``$OPDGEOM_DATA_<NAME>``, else the hub). A family
        preset's pinned sources go through ``tasks.roles.real_splits`` instead."""
        if SOURCES[self.name] is None:
            raise ValueError(
                f"domain {self.name!r} has no built-in data location: name its sources in the family preset "
                f"({self.name}.sft, {self.name}.prompts, optionally {self.name}.eval)"
            )
        dataset, config, train_split, eval_split = SOURCES[self.name]
        local = os.environ.get(f"OPDGEOM_DATA_{self.name.upper()}")
        if local:
            train = load_jsonl_dataset(os.path.join(local, f"{train_split}.jsonl"))
            held_out = load_jsonl_dataset(os.path.join(local, f"{eval_split}.jsonl"), limit=n_eval)
        else:
            train = load_hf_dataset(dataset, config, train_split)
            held_out = load_hf_dataset(dataset, config, eval_split, limit=n_eval)
        random.Random(seed).shuffle(train)
        return take(self.name, train, n_train, "train"), take(self.name, held_out, n_eval, "held-out")
