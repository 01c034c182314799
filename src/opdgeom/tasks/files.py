"""Examples on disk: our own JSONL files, and real GSM8K-style data sets.

Our files hold one JSON object per line with the keys "prompt", "completion" and "answer".
Real data sets are mapped to the same `Example` so that training and evaluation never care
where the data came from.
"""

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, fields

from opdgeom.io import write_text
from opdgeom.tasks.base import ANSWER_MARK, Example

EXAMPLE_KEYS = [field.name for field in fields(Example)]
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write examples atomically: a temp file in the same directory, then os.replace.

    A reader (or a Snakemake job) never sees a half-written file, even if this process dies.
    """
    write_text("".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples), path)


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read examples written by `write_jsonl`; errors name the file and the line."""
    examples = []
    for line_number, record in _json_lines(path):
        missing = [key for key in EXAMPLE_KEYS if key not in record]
        if missing:
            raise ValueError(f"{path}:{line_number}: missing key(s) {missing}; expected {EXAMPLE_KEYS}")
        not_text = [key for key in EXAMPLE_KEYS if not isinstance(record[key], str)]
        if not_text:
            raise ValueError(f"{path}:{line_number}: value(s) of {not_text} must be strings")
        examples.append(Example(**{key: record[key] for key in EXAMPLE_KEYS}))
    return examples


def gsm8k_example(question: str, solution: str) -> Example:
    """Map a GSM8K-style (question, "worked text #### 72") pair to an Example.

    The "<<48/2=24>>" calculator annotations are removed from the worked text; the answer is
    the text after the last "####".
    """
    if ANSWER_MARK not in solution:
        raise ValueError(f"solution has no {ANSWER_MARK!r} final answer: {solution[-80:]!r}")
    completion = CALCULATOR_ANNOTATION.sub("", solution).strip()
    answer = completion.rsplit(ANSWER_MARK, 1)[1].strip()
    return Example(prompt=f"Q: {question.strip()}\nA: ", completion=completion, answer=answer)


def load_jsonl_dataset(
    path: str | os.PathLike,
    question_key: str = "question",
    answer_key: str = "answer",
    limit: int | None = None,
) -> list[Example]:
    """Examples from a GSM8K-style JSONL file (at most `limit` of them, in file order)."""
    examples = []
    for line_number, record in _json_lines(path):
        if limit is not None and len(examples) >= limit:
            break
        missing = [key for key in (question_key, answer_key) if key not in record]
        if missing:
            raise ValueError(f"{path}:{line_number}: missing key(s) {missing}")
        try:
            examples.append(gsm8k_example(record[question_key], record[answer_key]))
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
    return examples


def load_hf_dataset(
    name: str,
    config: str | None,
    split: str,
    question_key: str = "question",
    answer_key: str = "answer",
    limit: int | None = None,
) -> list[Example]:
    """Examples from a Hugging Face data set such as ("openai/gsm8k", "main", "test").

    `datasets` is imported here, not at module level: most runs never need it.
    """
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError(f"loading {name!r} needs the 'datasets' package: pip install datasets") from error
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:
        raise RuntimeError(
            f"could not load data set {name!r} (config {config!r}, split {split!r}); "
            f"offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) or not cached? {error}"
        ) from error
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [gsm8k_example(row[question_key], row[answer_key]) for row in rows]


def _json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON names the file and line."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record
