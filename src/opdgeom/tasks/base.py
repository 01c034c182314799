"""What every domain shares: the example record, the task interface, answer checking, splits.

A task samples examples one at a time from a `random.Random`, so generation is deterministic
by seed and a split can draw until it has enough distinct prompts. The verifier is the same
for every domain: the reward is 1.0 iff the answer after the last "####" in a completion
equals the reference answer after both are put in canonical form.
"""

import random
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal

ANSWER_MARK = "####"

_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class Example:
    """One prompt with its worked solution; `completion` ends with "#### {answer}"."""

    prompt: str
    completion: str
    answer: str


def normalize_answer(text: str) -> str:
    """Canonical form of an answer, so formatting never decides a reward.

    Numbers lose surrounding spaces, a leading "+", thousands commas, a trailing period and
    trailing zeros ("+1,000.0." -> "1000", "-6.50" -> "-6.5"); other text is only stripped.
    """
    text = text.strip()
    number = text.removesuffix(".")
    if not _NUMBER.fullmatch(number):
        return text
    value = Decimal(number.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(completion: str) -> str | None:
    """The canonical answer on the line after the last "####", or None if there is none."""
    marker = completion.rfind(ANSWER_MARK)
    if marker < 0:
        return None
    tail = completion[marker + len(ANSWER_MARK) :].lstrip(" \t")
    return normalize_answer(tail.split("\n", 1)[0])


def verify(completion: str, answer: str) -> float:
    """Reward 1.0 iff the completion's final answer equals `answer`; 0.0 otherwise."""
    extracted = extract_answer(completion)
    return float(extracted is not None and extracted == normalize_answer(answer))


class Task(ABC):
    """A synthetic domain: a seeded generator of examples plus their verifier.

    Subclasses implement `sample` (one example from an rng) and `num_prompts` (the exact
    number of distinct prompts the generator can produce, which bounds any split).
    """

    name: str

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example; every distinct prompt must be equally likely."""

    @property
    @abstractmethod
    def num_prompts(self) -> int:
        """How many distinct prompts this task can generate."""

    def generate(self, n: int, seed: int) -> list[Example]:
        """`n` examples drawn independently (repeats possible); same seed, same list."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def verify(self, completion: str, answer: str) -> float:
        return verify(completion, answer)

    def verify_many(self, completions: list[str], answers: list[str]) -> list[float]:
        """Every completion's reward: what a step's or an evaluation's scoring calls (a domain whose
        verifier runs programs, the code domain, scores them concurrently)."""
        return [self.verify(c, a) for c, a in zip(completions, answers)]


def take(name: str, examples: list[Example], n: int, role: str) -> list[Example]:
    """The first ``n`` of a real data set's examples, saying so when it has fewer (it is not padded)."""
    if len(examples) < n:
        have = len(examples)
        print(f"{name}: {have} {role} examples available, {n} asked: using all {have}", file=sys.stderr)
    return examples[:n]


def split(task: Task, n_train: int, n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint train and eval sets: no prompt appears twice, within or across the two.

    Draws with one seeded rng until it holds `n_train + n_eval` distinct prompts; the first
    `n_train` found are the training set. Raises ValueError if the task cannot produce that
    many distinct prompts (or sampling stalls because the request nearly exhausts them).
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"split sizes must be non-negative, got n_train={n_train}, n_eval={n_eval}")
    needed = n_train + n_eval
    if needed > task.num_prompts:
        raise ValueError(
            f"task {task.name!r} has only {task.num_prompts} distinct prompts, "
            f"cannot split {n_train} train + {n_eval} eval without overlap; "
            "use larger task parameters or smaller splits"
        )
    rng = random.Random(seed)
    by_prompt: dict[str, Example] = {}
    max_draws = 50 * needed + 1000
    for _ in range(max_draws):
        if len(by_prompt) == needed:
            break
        example = task.sample(rng)
        by_prompt.setdefault(example.prompt, example)
    if len(by_prompt) < needed:
        raise ValueError(
            f"task {task.name!r}: found only {len(by_prompt)} distinct prompts in {max_draws} draws "
            f"for a request of {needed} (space {task.num_prompts}); ask for fewer examples"
        )
    examples = list(by_prompt.values())
    return examples[:n_train], examples[n_train:]
