"""The code domain (MBPP behind the task interface): loading, code extraction, and the "all tests pass"
reward, with hostile solutions scored 0 by the sandbox. Nothing is skipped: without bubblewrap the scoring
tests fail with SandboxUnavailable, as in test_sandbox.py."""

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from opdgeom.tasks.base import Example, Task
from opdgeom.tasks.code import LIMITS, CodeTask, extract_code, load_mbpp_jsonl
from opdgeom.tasks.datasets import DatasetTask

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "mbpp" / "test.jsonl"
SLACK_S = 3.0  # sandbox start and kill on a loaded 2-core machine


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return load_mbpp_jsonl(FIXTURE)


@pytest.fixture(scope="module")
def task() -> CodeTask:
    return CodeTask()


def by_function(examples: list[Example], name: str) -> Example:
    return next(e for e in examples if f"assert {name}(" in e.prompt or f"({name}(" in e.prompt)


def fenced(code: str) -> str:
    return f"Let me think about it.\n\n```python\n{code}\n```\n"


# --- loading -------------------------------------------------------------------------------------------


def test_loader_maps_fields(examples):
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert len(examples) == len(records) == 5
    for record, example in zip(records, examples):
        assert example.prompt.startswith("You are an expert Python programmer, and here is your task: ")
        assert record["prompt"] in example.prompt
        assert record["test_list"][0] in example.prompt
        assert all(test not in example.prompt for test in record["test_list"][1:])  # held out
        assert example.completion == f"```python\n{record['code']}\n```"
        assert json.loads(example.answer) == {"tests": record["test_list"], "imports": record["test_imports"]}
        assert extract_code(example.completion) == record["code"]
    assert any(json.loads(e.answer)["imports"] == ["import math"] for e in examples)
    assert len(load_mbpp_jsonl(FIXTURE, limit=2)) == 2


def good_record(**changes) -> dict:
    record = {
        "task_id": 1,
        "prompt": "Add one.",
        "code": "def f(x):\n    return x + 1",
        "test_list": ["assert f(1) == 2"],
    }
    return {**record, "test_imports": [], **changes}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"test_imports": None}, "'test_imports' must be a list of strings"),
        ({"test_list": "assert f(1) == 2"}, "'test_list' must be a list of strings"),
        ({"code": 3}, "'code' must be a string"),
        ({"test_list": []}, "test_list is empty"),
    ],
)
def test_loader_names_file_and_line_on_bad_records(tmp_path, bad, message):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(good_record()) + "\n\n" + json.dumps(good_record(**bad)) + "\n")
    with pytest.raises(ValueError, match=rf"mbpp.jsonl:3: {message}"):
        load_mbpp_jsonl(path)


def test_loader_names_missing_keys_and_bad_json(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    record = good_record()
    del record["test_list"]
    path.write_text(json.dumps(good_record()) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"mbpp.jsonl:2: missing key\(s\) \['test_list'\]"):
        load_mbpp_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"mbpp.jsonl:1: invalid JSON"):
        load_mbpp_jsonl(path)


def test_task_interface(tmp_path, monkeypatch, examples):
    task = CodeTask()
    assert isinstance(task, Task) and isinstance(task, DatasetTask)  # cli: DatasetTask -> load_splits
    assert task.name == "mbpp" and task.num_prompts == 0
    with pytest.raises(TypeError, match="'mbpp' is a real data set"):
        task.sample(random.Random(0))
    shutil.copy(FIXTURE, tmp_path / "train.jsonl")
    shutil.copy(FIXTURE, tmp_path / "test.jsonl")
    monkeypatch.setenv("OPDGEOM_DATA_MBPP", str(tmp_path))
    train, held_out = task.load_splits(3, 2, seed=0)
    assert held_out == examples[:2]
    assert len(train) == 3 and set(train) <= set(examples)
    assert task.load_splits(3, 2, seed=0) == (train, held_out)


# --- extraction ----------------------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_block():
    text = "First try:\n```python\nx = 1\n```\nBetter:\n```py\nx = 2\n```\nRun it:\n```bash\npython x.py\n```\n"
    assert extract_code(text) == "x = 2"
    assert extract_code("```\ny = 3\n```") == "y = 3"
    assert extract_code("````python\ns = '```'\n```\nt = 1\n````\ndone") == "s = '```'\n```\nt = 1"
    assert extract_code("<think>\n```python\na = 0\n```\n</think>\n\n```Python\r\nb = 1\r\n```") == "b = 1"


@pytest.mark.parametrize(
    "completion",
    [
        "def f(x):\n    return x + 1",  # unfenced: prose and code alike, never executed
        "Use `f(x) = x + 1`.",
        "```bash\nrm -rf /\n```",  # no python block
        "```python\ndef f(x):\n    return x + 1",  # truncated: fence never closed
        "```python\nx = 1\n```\nNow the final version:\n```python\ndef f(x):\n",  # truncated final fence
    ],
)
def test_extract_code_refuses_unfenced_or_unclosed(completion, task):
    assert extract_code(completion) is None
    assert task.extract_answer(completion) is None
    assert task.verify(completion, json.dumps({"tests": ["assert f(1) == 2"], "imports": []})) == 0.0


# --- scoring -------------------------------------------------------------------------------------------


def test_reference_solutions_score_one(task, examples):
    assert [task.verify(e.completion, e.answer) for e in examples] == [1.0] * len(examples)


@pytest.mark.parametrize(
    "answer, message",
    [
        ("not json", "not JSON"),
        ('["assert True"]', 'keys "tests" and "imports"'),
        ('{"tests": "assert True", "imports": []}', '"tests" must be a list of strings'),
        ('{"tests": [], "imports": []}', '"tests" is empty'),
    ],
)
def test_malformed_answer_is_our_error(task, answer, message):
    with pytest.raises(ValueError, match=message):
        task.verify(fenced("pass"), answer)
    with pytest.raises(ValueError, match=message):
        task.verify_many([fenced("pass")], [answer])


def test_wrong_and_raising_solutions_score_zero(task, examples):
    odds = by_function(examples, "first_odds")
    assert task.verify(fenced("def first_odds(n):\n    return [2 * i + 1 for i in range(n + 1)]"), odds.answer) == 0.0
    assert task.verify(fenced("def first_odds(n):\n    return [2 * i - 1 for i in range(n)]"), odds.answer) == 0.0
    assert task.verify(fenced("def first_odds(n):\n    raise RuntimeError('no')"), odds.answer) == 0.0
    assert task.verify(fenced("def first_odds(n) return []"), odds.answer) == 0.0  # syntax error
    # the imports come from the answer: a solution that forgets `import math` still sees it
    hyp = by_function(examples, "hypotenuse")
    assert task.verify(fenced("def hypotenuse(a, b):\n    return math.hypot(a, b)"), hyp.answer) == 1.0


HOSTILE = {
    "infinite loop": "def digit_sum(n):\n    while True:\n        pass",
    "exits before the tests": "import sys\n\ndef digit_sum(n):\n    return 0\n\nsys.exit(0)",
    "reads the checkout": (
        f"open({str(REPO / 'pyproject.toml')!r}).read()\n\ndef digit_sum(n):\n    return sum(int(c) for c in str(n))"
    ),
    "uses the network": (
        "import socket\n\nsocket.create_connection(('1.1.1.1', 53), timeout=2).close()\n\n"
        "def digit_sum(n):\n    return sum(int(c) for c in str(n))"
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_solutions_score_zero_quickly(task, examples, name):
    # each would be a correct solution (1.0) if the sandbox let its side effect through
    answer = by_function(examples, "digit_sum").answer
    start = time.monotonic()
    assert task.verify(fenced(HOSTILE[name]), answer) == 0.0
    assert time.monotonic() - start < LIMITS.wall_s + SLACK_S


def test_verify_many_matches_verify_and_runs_concurrently(task, examples):
    odds = by_function(examples, "first_odds")
    wrong = fenced("def first_odds(n):\n    return list(range(1, 2 * n, 2))[:-1]")
    completions = [e.completion for e in examples] + [wrong, "no code at all", odds.completion]
    answers = [e.answer for e in examples] + [odds.answer] * 3
    completions, answers = (completions * 2)[:16], (answers * 2)[:16]
    start = time.monotonic()
    serial = [task.verify(c, a) for c, a in zip(completions, answers)]
    serial_s = time.monotonic() - start
    start = time.monotonic()
    many = task.verify_many(completions, answers)
    many_s = time.monotonic() - start
    assert many == serial
    assert serial.count(1.0) == 12 and serial.count(0.0) == 4
    print(
        f"\n{len(completions)} programs: serial {serial_s:.2f} s, verify_many {many_s:.2f} s, "
        f"speedup {serial_s / many_s:.2f}x"
    )
    assert task.verify_many([], []) == []
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        task.verify_many(completions[:2], answers[:1])
