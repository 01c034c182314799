"""Training problems that share text with a held-out benchmark are left out of training.

The rule follows open-r1's ``scripts/decontaminate.py``: a training problem is contaminated when it
shares any word 8-gram with a benchmark problem. Words are stricter here than its whitespace split:
runs of letters or digits after lower casing, with the arithmetic signs + - * / = ^ < > as words of
their own (so "4-9*3" and "4+9*3" differ); everything else (LaTeX markup, dollar signs, braces,
punctuation, spacing) is dropped, so it does not hide a copy. A problem shorter than 8 words, which
open-r1 never matches, is compared whole with the benchmark problems as short as it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NGRAM = 8
_WORD = re.compile(r"[0-9a-z]+|[-+*/=^<>]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The word n-grams of ``text``; the whole word sequence when it is shorter than ``n``."""
    tokens = words(text)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class Decontaminator:
    """The n-grams of every benchmark problem; :meth:`contaminated` tests one training problem."""

    def __init__(self, benchmark_problems: Iterable[str], n: int = NGRAM):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()  # benchmark problems shorter than n words, whole
        for problem in benchmark_problems:
            for gram in ngrams(problem, n):
                (self.grams if len(gram) == n else self.short).add(gram)

    def contaminated(self, problem: str) -> bool:
        tokens = words(problem)
        if tuple(tokens) in self.short:
            return True
        return any(tuple(tokens[i : i + self.n]) in self.grams for i in range(len(tokens) - self.n + 1))
