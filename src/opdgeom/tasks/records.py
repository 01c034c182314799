"""Hub records -> our ``Example``: dotted field paths and the mappers a source names.

A mapper is built from its source (``MAPPERS[source.mapper](source)``) and turns one record into an
Example, raises KeyError/ValueError on a malformed record (the loader names the source and record), or
raises :class:`SkipRecord` for a well-formed record the study does not use (counted, never silent).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opdgeom.tasks.base import Example
from opdgeom.tasks.files import gsm8k_example

if TYPE_CHECKING:
    from opdgeom.tasks.sources import Source

EXAMPLE_FIELDS = ("prompt", "completion", "answer")
Mapper = Callable[[Mapping[str, Any]], Example]


# Each mapper's record field names (``Source.fields`` renames them) and which of them is the problem
# statement. The "fields" mapper has no defaults: its source names every path.
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "fields": {},
    "gsm8k": {"question": "question", "solution": "answer"},
    "mbpp": {"text": "prompt", "code": "code", "tests": "test_list", "imports": "test_imports"},
    "verified_trace": {
        "prompt": "problem",
        "answer": "answer",
        "generations": "generations",
        "correct": "correctness_math_verify",
        "complete": "is_reasoning_complete",
    },
}
PROBLEM_FIELD = {"fields": "prompt", "gsm8k": "question", "mbpp": "text", "verified_trace": "prompt"}


def field_names(source: Source) -> dict[str, str]:
    """The record paths a source's mapper reads: its defaults, renamed by ``source.fields``."""
    return DEFAULT_FIELDS[source.mapper] | dict(source.fields)


class SkipRecord(Exception):
    """A record the mapper leaves out on purpose (e.g. no verified trace); its reason is counted."""


def read_field(record: Any, path: str) -> Any:
    """The value at a dotted path: ``"messages.1.content"`` is ``record["messages"][1]["content"]``.

    An integer part indexes a list (negative from the end). A missing key or index raises KeyError
    naming the path, the part that failed, and the keys (or length) found there.
    """
    value = record
    for depth, part in enumerate(path.split(".")):
        at = ".".join(path.split(".")[:depth]) or "the record"
        if isinstance(value, Mapping):
            if part not in value:
                keys = ", ".join(map(str, value.keys()))
                raise KeyError(f"field {path!r}: no key {part!r} in {at} (its keys: {keys})")
            value = value[part]
        elif isinstance(value, (list, tuple)):
            try:
                value = value[int(part)]
            except ValueError:
                raise KeyError(f"field {path!r}: {at} is a list; {part!r} is not an index") from None
            except IndexError:
                raise KeyError(f"field {path!r}: index {part} out of range ({at} has {len(value)} items)") from None
        else:
            raise KeyError(f"field {path!r}: {at} is a {type(value).__name__}, not a mapping or list")
    return value


def text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def field_mapper(source: Source) -> Mapper:
    """record -> Example through ``source.fields``; a prompt-only source's completion (or answer) is ''."""
    paths = dict(source.fields)
    if "prompt" not in paths:
        raise ValueError(f"{source.describe()}: fields has no 'prompt' path")

    def mapper(record: Mapping[str, Any]) -> Example:
        values = {name: text(read_field(record, paths[name])) if name in paths else "" for name in EXAMPLE_FIELDS}
        return Example(**values)

    return mapper


def gsm8k_mapper(source: Source) -> Mapper:
    """GSM8K-style records ("worked text #### 72") through ``files.gsm8k_example``.

    ``fields`` may rename the two record fields ``question`` and ``solution`` (defaults:
    ``DEFAULT_FIELDS['gsm8k']``).
    """
    names = field_names(source)

    def mapper(record: Mapping[str, Any]) -> Example:
        return gsm8k_example(read_field(record, names["question"]), read_field(record, names["solution"]))

    return mapper


def mbpp_mapper(source: Source) -> Mapper:
    """MBPP records (task text, reference code, assert tests, test imports) through
    ``code.mbpp_example``; ``fields`` may rename them (defaults: MBPP's own names)."""
    from opdgeom.tasks.code import mbpp_example

    names = field_names(source)

    def mapper(record: Mapping[str, Any]) -> Example:
        imports = read_field(record, names["imports"]) if names["imports"] in record else []
        return mbpp_example(read_field(record, names["text"]), read_field(record, names["code"]),
                            read_field(record, names["tests"]), imports)  # fmt: skip

    return mapper


def verified_trace_mapper(source: Source) -> Mapper:
    """Records with several sampled reasoning traces and per-trace checks (OpenR1-Math-220k's layout):
    the completion is the first trace that is both verified correct and complete (it reached its final
    answer); a record with none is skipped, so no demonstration teaches a wrong or cut-off solution.

    ``fields`` may rename: ``prompt``, ``answer``, ``generations`` (the list of traces), ``correct``
    (one bool per trace), ``complete`` (one bool per trace; optional: leave it out of the record and
    every trace counts as complete). Defaults: ``DEFAULT_FIELDS['verified_trace']``.
    """
    names = field_names(source)

    def mapper(record: Mapping[str, Any]) -> Example:
        traces = read_field(record, names["generations"])
        correct = read_field(record, names["correct"])
        complete = read_field(record, names["complete"]) if names["complete"] in record else [True] * len(traces)
        if not (isinstance(traces, list) and isinstance(correct, list) and isinstance(complete, list)):
            raise ValueError(f"{names['generations']}, {names['correct']}, {names['complete']}: expected lists")
        if not len(traces) == len(correct) == len(complete):
            raise ValueError(
                f"{len(traces)} {names['generations']} but {len(correct)} {names['correct']} and "
                f"{len(complete)} {names['complete']} flags"
            )
        for trace, ok, done in zip(traces, correct, complete):
            if ok is True and done is True and isinstance(trace, str) and trace.strip():
                prompt, answer = (text(read_field(record, names[key])) for key in ("prompt", "answer"))
                return Example(prompt, trace, answer)
        raise SkipRecord("no verified complete trace")

    return mapper


def problem_path(source: Source) -> str:
    """The record path of the problem statement alone, without a mapper's instructions or tests
    (what decontamination compares)."""
    return field_names(source)[PROBLEM_FIELD[source.mapper]]


MAPPERS: dict[str, Callable[[Source], Mapper]] = {
    "fields": field_mapper,
    "gsm8k": gsm8k_mapper,
    "mbpp": mbpp_mapper,
    "verified_trace": verified_trace_mapper,
}
