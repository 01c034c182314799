"""Data domains of the study: synthetic tasks with verifiers, a pretraining corpus, file I/O.

`get_task(name, **params)` is how the config names a domain ("math", "programs", or a real data
set such as "gsm8k", or "mbpp", the code domain whose programs run in the sandbox).
"""

from opdgeom.tasks.base import Example, Task, extract_answer, normalize_answer, split, verify
from opdgeom.tasks.code import CodeTask
from opdgeom.tasks.corpus import generic_corpus
from opdgeom.tasks.datasets import SOURCES as DATASET_SOURCES
from opdgeom.tasks.datasets import DatasetTask
from opdgeom.tasks.files import load_hf_dataset, load_jsonl_dataset, read_jsonl, write_jsonl
from opdgeom.tasks.math import MathTask
from opdgeom.tasks.programs import ProgramTask

TASKS: dict[str, type[Task]] = {MathTask.name: MathTask, ProgramTask.name: ProgramTask, CodeTask.name: CodeTask}


def get_task(name: str, **params) -> Task:
    """The task registered as `name`, built with `params` (its constructor's keywords)."""
    if name in DATASET_SOURCES:
        return DatasetTask(name)
    if name not in TASKS:
        raise ValueError(f"unknown task domain {name!r}; known domains: {sorted([*TASKS, *DATASET_SOURCES])}")
    return TASKS[name](**params)


def known_domains() -> list[str]:
    return sorted([*TASKS, *DATASET_SOURCES])


__all__ = [
    "CodeTask",
    "DatasetTask",
    "known_domains",
    "Example",
    "MathTask",
    "ProgramTask",
    "TASKS",
    "Task",
    "extract_answer",
    "generic_corpus",
    "get_task",
    "load_hf_dataset",
    "load_jsonl_dataset",
    "normalize_answer",
    "read_jsonl",
    "split",
    "verify",
    "write_jsonl",
]
