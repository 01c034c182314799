"""Data domains of the study: synthetic tasks with verifiers, a pretraining corpus, file I/O.

`get_task(name, **params)` is how the config names a domain ("math", "programs").
"""

from opdgeom.tasks.base import Example, Task, extract_answer, normalize_answer, split, verify
from opdgeom.tasks.corpus import generic_corpus
from opdgeom.tasks.files import load_hf_dataset, load_jsonl_dataset, read_jsonl, write_jsonl
from opdgeom.tasks.math import MathTask
from opdgeom.tasks.programs import ProgramTask

TASKS: dict[str, type[Task]] = {MathTask.name: MathTask, ProgramTask.name: ProgramTask}


def get_task(name: str, **params) -> Task:
    """The task registered as `name`, built with `params` (its constructor's keywords)."""
    if name not in TASKS:
        raise ValueError(f"unknown task domain {name!r}; known domains: {sorted(TASKS)}")
    return TASKS[name](**params)


__all__ = [
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
