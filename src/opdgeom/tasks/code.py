"""The code domain: MBPP problems with unit tests; the reward is "every test passes in the sandbox".

Data: MBPP (Austin et al. 2021, "Program Synthesis with Large Language Models", arXiv:2108.07732), the
hand-checked "sanitized" config of ``google-research-datasets/mbpp`` (splits train 120, validation 43,
test 257, prompt 7). A record has ``prompt`` (the task text), ``code`` (a reference solution),
``test_list`` (assert statements) and ``test_imports`` (import lines the asserts need). It maps to an
``Example`` of three strings:

- prompt: the MBPP paper's prompt, "You are an expert Python programmer, and here is your task: {text}
  Your code should pass these tests:\n\n{tests}\n" (the same wording opens each few-shot MBPP example
  in e.g. agential-ai/agential, agential/cog/prompts/benchmark/mbpp.py; lighteval and open-r1 use
  variants), with only
  the FIRST test shown: it fixes the function's name and signature while the other tests stay held out,
  so hard-coding the visible case does not earn the reward. One sentence asking for a fenced
  ```python block is appended, since only fenced code is ever run (see ``extract_code``).
- completion: the reference code in a ```python fenced block.
- answer: JSON ``{"tests": [...], "imports": [...]}``.

Model-written code runs only inside ``opdgeom.sandbox`` (bubblewrap, no network, no view of the
checkout, rlimits) with ``LIMITS``; ``verify_many`` scores a batch with one sandbox process per program,
several at a time.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from opdgeom import sandbox
from opdgeom.tasks.base import Example, take
from opdgeom.tasks.datasets import DatasetTask
from opdgeom.tasks.files import _json_lines

NAME = "mbpp"
HUB_DATASET = ("google-research-datasets/mbpp", "sanitized")
TRAIN_SPLIT, EVAL_SPLIT = "train", "test"

# Per program (solution + imports + every test in one process): 5 s of CPU, 10 s of wall time (a
# sleeping or blocked program), 512 MB of address space. MBPP's reference solutions need well under
# 1 s and 100 MB; the margin is for slow but correct model code on a loaded node.
LIMITS = sandbox.Limits(cpu_s=5, wall_s=10, memory_mb=512)

PROMPT_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n\n"
    "Write your solution in a single ```python code block.\n"
)
RECORD_KEYS = ("prompt", "code", "test_list", "test_imports")
PYTHON_TAGS = {"", "python", "py", "python3"}

_OPEN_FENCE = re.compile(r"^ {0,3}(`{3,})[ \t]*([^`\s]*)[^`]*$")
_CLOSE_FENCE = re.compile(r"^ {0,3}(`{3,})[ \t]*$")


def format_prompt(text: str, tests: Sequence[str]) -> str:
    """The prompt for an MBPP task text, showing only the first test (the signature hint)."""
    return PROMPT_TEMPLATE.format(text=_lf(text).strip(), tests=_lf(tests[0]).strip())


def mbpp_example(text: str, code: str, tests: Sequence[str], imports: Sequence[str]) -> Example:
    """Map one MBPP record's fields to an Example (see the module docstring)."""
    if not tests:
        raise ValueError("test_list is empty: a problem without tests cannot be scored")
    answer = json.dumps({"tests": [_lf(t) for t in tests], "imports": [_lf(i) for i in imports]})
    return Example(
        prompt=format_prompt(text, tests),
        completion=f"```python\n{_lf(code).strip()}\n```",
        answer=answer,
    )


def extract_code(completion: str) -> str | None:
    """The code of the LAST fenced block tagged python/py/python3 or untagged, or None.

    Blocks in other languages (```bash, ```text) are skipped. Without any such block the answer is None
    and scores 0: a reasoning model writes prose, pseudo-code and half-finished attempts, and only what it
    explicitly marked as code may be executed -- running its whole text would reward accidents and make
    prose a program. A fence still open at the end (the completion was truncated) also gives None: the
    model never finished, and its last closed block is an earlier draft.
    """
    found = None
    fence = None  # (backtick count, is python, body lines) of the open block
    for line in completion.split("\n"):
        line = line.rstrip("\r")
        if fence is None:
            match = _OPEN_FENCE.match(line)
            if match:
                fence = (len(match.group(1)), match.group(2).lower() in PYTHON_TAGS, [])
            continue
        close = _CLOSE_FENCE.match(line)
        if close and len(close.group(1)) >= fence[0]:
            if fence[1]:
                found = "\n".join(fence[2])
            fence = None
        else:
            fence[2].append(line)
    if fence is not None:
        return None
    return found


def parse_answer(answer: str) -> tuple[list[str], list[str]]:
    """(tests, imports) from an answer string; ValueError naming the problem if it is malformed (our
    data's fault, never the model's, so it is not silently scored 0)."""
    try:
        record = json.loads(answer)
    except json.JSONDecodeError as error:
        raise ValueError(f"code answer is not JSON ({error.msg}): {answer[:80]!r}") from None
    if not isinstance(record, dict) or set(record) != {"tests", "imports"}:
        raise ValueError(f'code answer must be a JSON object with keys "tests" and "imports": {answer[:80]!r}')
    tests, imports = record["tests"], record["imports"]
    for key, value in (("tests", tests), ("imports", imports)):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f'code answer: "{key}" must be a list of strings, got {value!r:.80}')
    if not tests:
        raise ValueError(f'code answer: "tests" is empty, nothing to verify: {answer[:80]!r}')
    return tests, imports


def load_mbpp_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """Examples from a JSONL mirror of MBPP (sanitized), one record per line, at most ``limit`` of them in
    file order; errors name the file and the line."""
    examples = []
    for line_number, record in _json_lines(path):
        if limit is not None and len(examples) >= limit:
            break
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"{path}:{line_number}: missing key(s) {missing}; an MBPP record has {list(RECORD_KEYS)}")
        for key in ("prompt", "code"):
            if not isinstance(record[key], str):
                raise ValueError(f"{path}:{line_number}: {key!r} must be a string, got {type(record[key]).__name__}")
        for key in ("test_list", "test_imports"):
            value = record[key]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"{path}:{line_number}: {key!r} must be a list of strings, got {value!r:.80}")
        try:
            examples.append(mbpp_example(record["prompt"], record["code"], record["test_list"], record["test_imports"]))
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
    return examples


def load_mbpp_hub(split: str, limit: int | None = None) -> list[Example]:
    """Examples from the hub's ``google-research-datasets/mbpp`` (sanitized); needs ``datasets``."""
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError("loading MBPP needs the 'datasets' package: pip install datasets") from error
    name, config = HUB_DATASET
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:
        raise RuntimeError(
            f"could not load data set {name!r} (config {config!r}, split {split!r}); offline "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) or not cached? Set OPDGEOM_DATA_MBPP to a JSONL mirror. {error}"
        ) from error
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [mbpp_example(r["prompt"], r["code"], r["test_list"], r["test_imports"]) for r in rows]


class CodeTask(DatasetTask):
    """MBPP behind the task interface: a real data set (no generator), reward 1.0 iff all tests pass.

    It is a ``DatasetTask`` so that the data-preparation path (``isinstance(task, DatasetTask)`` ->
    ``load_splits``) treats it like the other real data sets; it does not use ``datasets.SOURCES``.
    ``limits`` is for tests only; runs use ``LIMITS``.
    """

    name = NAME

    def __init__(self, limits: sandbox.Limits = LIMITS):
        self.limits = limits

    @property
    def num_prompts(self) -> int:
        return 0

    def sample(self, rng: random.Random) -> Example:
        raise TypeError(f"domain {self.name!r} is a real data set: it has examples, not a generator")

    def extract_answer(self, completion: str) -> str | None:
        return extract_code(completion)

    def verify(self, completion: str, answer: str) -> float:
        """1.0 iff the completion's last python block, after the answer's imports, passes every test in
        the sandbox; malformed ``answer`` raises ValueError, anything the program does scores 0.0. A
        missing sandbox raises ``SandboxUnavailable`` (never a silent 0, never an unsandboxed run)."""
        tests, imports = parse_answer(answer)
        code = extract_code(completion)
        if code is None:
            return 0.0
        return self._run(code, tests, imports)

    def verify_many(
        self, completions: Sequence[str], answers: Sequence[str], workers: int | None = None
    ) -> list[float]:
        """``[verify(c, a) for c, a in zip(completions, answers)]``, with up to ``workers`` sandboxes at a
        time (default ``os.cpu_count()``); each sandbox is its own process, so threads suffice. All answers
        are checked before any program runs."""
        if len(completions) != len(answers):
            raise ValueError(f"verify_many: {len(completions)} completions but {len(answers)} answers")
        parsed = [parse_answer(answer) for answer in answers]
        codes = [extract_code(completion) for completion in completions]
        jobs = [i for i, code in enumerate(codes) if code is not None]
        scores = [0.0] * len(completions)
        if not jobs:
            return scores
        sandbox.check_available()  # one clear SandboxUnavailable, not one per thread
        with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
            results = pool.map(lambda i: self._run(codes[i], *parsed[i]), jobs)
            for i, score in zip(jobs, results):
                scores[i] = score
        return scores

    def _run(self, code: str, tests: list[str], imports: list[str]) -> float:
        try:
            code.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not a program the sandbox can be given
            return 0.0
        solution = "\n".join([*imports, code])
        return float(sandbox.passes_tests(solution, "\n".join(tests), self.limits))

    def load_splits(self, n_train: int, n_eval: int, seed: int):
        """The first ``n_eval`` test problems, and ``n_train`` train problems shuffled by seed (the sanitized
        train split has only 120), from a JSONL mirror in ``$OPDGEOM_DATA_MBPP/{train,test}.jsonl``, else
        the hub. A family preset's pinned sources go through ``tasks.roles.real_splits`` instead."""
        local = os.environ.get("OPDGEOM_DATA_MBPP")
        if local:
            train = load_mbpp_jsonl(os.path.join(local, f"{TRAIN_SPLIT}.jsonl"))
            held_out = load_mbpp_jsonl(os.path.join(local, f"{EVAL_SPLIT}.jsonl"), limit=n_eval)
        else:
            train = load_mbpp_hub(TRAIN_SPLIT)
            held_out = load_mbpp_hub(EVAL_SPLIT, limit=n_eval)
        random.Random(seed).shuffle(train)
        return take(self.name, train, n_train, "train"), take(self.name, held_out, n_eval, "held-out")


def _lf(text: str) -> str:
    """MBPP's original records use Windows line ends; the sandbox and the prompt get plain "\\n"."""
    return text.replace("\r\n", "\n")
