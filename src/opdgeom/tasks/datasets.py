"""Real data sets behind the task interface, for the cluster presets (GSM8K style: "#### answer").

A real domain has no generator: its examples come from the hub (or a local JSONL mirror set with
OPDGEOM_DATA_<NAME> for air-gapped clusters). Its verifier is a reasoning model's: the last
``\\boxed{}`` answer (else the one after "####") checked for mathematical equivalence by math-verify,
with a per-answer time limit (``tasks.answers``); the synthetic domains keep their exact verifier.
"""

import os
import random
import sys
from collections.abc import Mapping

from opdgeom.tasks.answers import final_answer, verify_math
from opdgeom.tasks.base import Example, Task, take
from opdgeom.tasks.files import load_hf_dataset, load_jsonl_dataset
from opdgeom.tasks.sources import Source, load_source

SOURCES = {
    # name: (hub data set, config, train split, eval split)
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
}


class DatasetTask(Task):
    """A named real data set; ``load_splits`` replaces ``split`` for it."""

    def splits_from_sources(self, sources, n_train: int, n_eval: int, seed: int, family: str | None):
        missing = sorted({"train", "eval"} - set(sources))
        if missing:
            raise ValueError(f"domain {self.name!r}: sources lack {missing} (family preset keys {self.name}.<role>)")
        loaded = {}
        for role, source in sources.items():
            loaded[role], dropped = load_source(source, family=family)
            if dropped:
                print(
                    f"{self.name} {role}: dropped {dropped} examples longer than {source.max_tokens}", file=sys.stderr
                )
        train = loaded["train"]
        random.Random(seed).shuffle(train)
        return take(self.name, train, n_train, "train"), take(self.name, loaded["eval"], n_eval, "held-out")

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

    def load_splits(
        self,
        n_train: int,
        n_eval: int,
        seed: int,
        sources: Mapping[str, Source] | None = None,
        family: str | None = None,
    ) -> tuple[list[Example], list[Example]]:
        """The first ``n_eval`` test examples, and ``n_train`` train examples shuffled by seed.

        ``sources`` (``{"train": Source, "eval": Source}``, from the family preset): read offline and pinned
        (``tasks.sources.load_source``: a JSONL mirror, the hub or datasets cache; a missing one names
        ``opdgeom fetch-data --family F``). Without them, the domain's built-in hub location."""
        if sources is not None:
            return self.splits_from_sources(sources, n_train, n_eval, seed, family)
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
