"""A generic synthetic pretraining corpus, deliberately unlike the task formats.

Tiny models are pretrained on it briefly so that their weights carry a learned, structured
spectrum before SFT, OPD or RLVR start; a randomly initialised matrix would make every
spectral diagnostic measure noise. The documents mix grammar sentences, counting, copying
and key=value lookups, use printable ASCII and "\\n" only, and never contain the "####"
answer mark or the "Q: ...=?" question form of the tasks.
"""

import random
import string

ADJECTIVES = ["small", "red", "old", "quiet", "bright", "green", "heavy", "quick", "cold", "round"]
NOUNS = ["cat", "dog", "box", "tree", "river", "stone", "bird", "lamp", "road", "cup", "ship", "hill"]
VERBS = ["sees", "finds", "moves", "holds", "likes", "follows", "takes", "keeps"]
PLACES = ["near the house", "by the river", "on the hill", "in the box", "under the tree"]


def generic_corpus(n_docs: int, seed: int) -> list[str]:
    """`n_docs` documents of mixed kinds, deterministic by seed."""
    rng = random.Random(seed)
    kinds = [_sentences, _counting, _copying, _key_values]
    return [rng.choice(kinds)(rng) for _ in range(n_docs)]


def _sentences(rng: random.Random) -> str:
    """A few sentences from a small subject-verb-object grammar."""
    lines = []
    for _ in range(rng.randint(1, 3)):
        subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        obj = f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        place = f" {rng.choice(PLACES)}" if rng.random() < 0.5 else ""
        lines.append(f"{subject} {rng.choice(VERBS)} {obj}{place}.".capitalize())
    return " ".join(lines)


def _counting(rng: random.Random) -> str:
    """An arithmetic progression, up or down: teaches digits and their order."""
    start, step, length = rng.randint(0, 50), rng.choice([1, 1, 2, 3, 5, -1]), rng.randint(4, 10)
    numbers = " ".join(str(start + step * i) for i in range(length))
    return f"count from {start} by {step}: {numbers}"


def _copying(rng: random.Random) -> str:
    """Random letter groups repeated verbatim, or reversed: teaches attention to context."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 5))) for _ in range(rng.randint(2, 4))]
    text = " ".join(words)
    if rng.random() < 0.5:
        return f"copy: {text}\nagain: {text}"
    return f"reverse: {text}\nresult: {text[::-1]}"


def _key_values(rng: random.Random) -> str:
    """A key=value list followed by one lookup of a listed key."""
    keys = rng.sample(string.ascii_lowercase, k=rng.randint(2, 5))
    pairs = {key: rng.randint(0, 99) for key in keys}
    listing = ", ".join(f"{key}={value}" for key, value in pairs.items())
    asked = rng.choice(keys)
    return f"table: {listing}\nlookup {asked} -> {pairs[asked]}"
