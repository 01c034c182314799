"""Synthetic tasks, verifier, splits, pretraining corpus and JSONL I/O."""

import contextlib
import io
import json
import re
import string
import sys

import pytest

from opdgeom.tasks import (
    Example,
    MathTask,
    ProgramTask,
    generic_corpus,
    get_task,
    load_hf_dataset,
    load_jsonl_dataset,
    read_jsonl,
    split,
    verify,
    write_jsonl,
)

TASKS = [MathTask(), MathTask(n_ops=3, max_operand=12), ProgramTask(), ProgramTask(n_assignments=3)]


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("7+3=10;10-4=6 #### 6", "6", 1.0),
        ("7+3=10;10-4=6 #### 7", "6", 0.0),
        ("#### 6", "6", 1.0),
        ("####6", "6", 1.0),
        ("x #### 6  ", "6", 1.0),
        ("x ####   +6", "6", 1.0),
        ("x #### 6.", "6", 1.0),
        ("x #### 6.0", "6", 1.0),
        ("x #### 6.50", "6.5", 1.0),
        ("x #### 1,234", "1234", 1.0),
        ("x #### 1,234,567.", "1,234,567", 1.0),
        ("x #### -72", "-72", 1.0),
        ("x #### -72", "72", 0.0),
        ("x #### 72", "-72", 0.0),
        ("x #### 6\nQ: 1+1=?", "6", 1.0),
        ("x #### 6 7", "6", 0.0),
        ("x #### 12,34", "1234", 0.0),
        ("x #### ", "6", 0.0),
        ("7+3=10;10-4=6 6", "6", 0.0),
        ("", "6", 0.0),
        ("#### 5 then #### 6", "6", 1.0),
        ("#### 6 then #### 5", "6", 0.0),
        ("x #### apple", " apple ", 1.0),
    ],
)
def test_verify_cases(completion, answer, reward):
    assert verify(completion, answer) == reward


def test_extract_answer_is_canonical_and_none_without_mark():
    task = MathTask()
    assert task.extract_answer("a #### +1,000.0.") == "1000"
    assert task.extract_answer("a #### -0.250") == "-0.25"
    assert task.extract_answer("no mark here 6") is None


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.name}-{t.num_prompts}")
def test_generated_completions_verify_against_own_answer_only(task):
    examples = task.generate(300, seed=3)
    for example in examples:
        assert task.verify(example.completion, example.answer) == 1.0
        wrong = str(int(example.answer) + 1)
        assert task.verify(example.completion, wrong) == 0.0
        assert example.completion.endswith(f" #### {example.answer}")
        assert example.prompt.startswith("Q: ") and example.prompt.endswith("\nA: ")


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.name}-{t.num_prompts}")
def test_generation_is_deterministic_by_seed(task):
    assert task.generate(50, seed=11) == task.generate(50, seed=11)
    assert task.generate(50, seed=11) != task.generate(50, seed=12)


def test_default_formats_stay_short():
    math_examples = MathTask().generate(2000, seed=0)
    assert max(len(e.prompt) for e in math_examples) <= 24
    assert max(len(e.completion) for e in math_examples) <= 40
    program_examples = ProgramTask().generate(2000, seed=0)
    assert max(len(e.prompt) for e in program_examples) <= 32
    assert max(len(e.completion) for e in program_examples) <= 40


def _left_to_right(expression: str) -> int:
    """Independent evaluation of a math prompt: apply each operator to the running value."""
    tokens = re.findall(r"\d+|[+\-*]", expression)
    value = int(tokens[0])
    for symbol, operand in zip(tokens[1::2], tokens[2::2]):
        value = eval(f"({value}){symbol}{operand}")
    return value


def test_math_answers_and_steps_match_independent_evaluation():
    for example in MathTask(n_ops=3).generate(500, seed=5):
        expression = example.prompt.removeprefix("Q: ").removesuffix("=?\nA: ")
        assert int(example.answer) == _left_to_right(expression)
        steps = example.completion.split(" #### ")[0].split(";")
        assert len(steps) == 3
        for step in steps:
            left, right = step.rsplit("=", 1)
            assert eval(left) == int(right)


def test_math_is_left_to_right_not_precedence():
    from opdgeom.tasks.math import worked_chain

    example = worked_chain([2, 3, 4], ["+", "*"])
    assert example == Example("Q: 2+3*4=?\nA: ", "2+3=5;5*4=20 #### 20", "20")


def _run_program(prompt: str) -> str:
    source = prompt.removeprefix("Q: ").removesuffix("\nA: ").replace(";", "\n")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(source, {})
    return output.getvalue().strip()


@pytest.mark.parametrize("task", [ProgramTask(), ProgramTask(n_assignments=4, max_value=5)])
def test_program_answers_match_python_exec(task):
    for example in task.generate(500, seed=9):
        assert example.answer == _run_program(example.prompt)


def test_program_trace_lists_each_variable_value():
    example = ProgramTask().generate(1, seed=0)[0]
    namespace = {}
    source = example.prompt.removeprefix("Q: ").removesuffix("\nA: ").split(";print")[0]
    exec(source.replace(";", "\n"), namespace)
    expected = ";".join(f"{name}={namespace[name]}" for name in "xy")
    assert example.completion == f"{expected};{example.answer} #### {example.answer}"


@pytest.mark.parametrize("task", [MathTask(n_ops=1, max_operand=2), ProgramTask(n_assignments=2, max_value=2)])
def test_num_prompts_equals_the_reachable_space(task):
    prompts = {example.prompt for example in task.generate(30 * task.num_prompts, seed=0)}
    assert len(prompts) == task.num_prompts


def test_default_prompt_space_sizes():
    assert MathTask().num_prompts == 9**3 * 3**2 == 6561
    assert ProgramTask().num_prompts == 9 * 30 * 66 == 17820


def test_split_is_disjoint_deterministic_and_sized():
    task = MathTask()
    train, evaluation = split(task, n_train=2000, n_eval=300, seed=1)
    assert (len(train), len(evaluation)) == (2000, 300)
    train_prompts = {e.prompt for e in train}
    assert len(train_prompts) == 2000
    assert train_prompts.isdisjoint(e.prompt for e in evaluation)
    assert split(task, 2000, 300, seed=1) == (train, evaluation)
    assert split(task, 2000, 300, seed=2) != (train, evaluation)


def test_split_can_use_the_whole_space_and_refuses_more():
    task = MathTask(n_ops=1, max_operand=2)
    train, evaluation = split(task, n_train=8, n_eval=4, seed=0)
    assert len({e.prompt for e in train + evaluation}) == 12
    with pytest.raises(ValueError, match="only 12 distinct prompts"):
        split(task, n_train=10, n_eval=3, seed=0)


def test_get_task_builds_with_params_and_names_unknown_domains():
    task = get_task("math", n_ops=3, max_operand=5)
    assert isinstance(task, MathTask) and (task.n_ops, task.max_operand) == (3, 5)
    assert isinstance(get_task("programs"), ProgramTask)
    with pytest.raises(ValueError, match=r"'chess'.*\['competition_math', 'gsm8k', 'math', 'mbpp', 'programs'\]"):
        get_task("chess")


def test_generic_corpus_is_ascii_deterministic_and_not_the_task_format():
    documents = generic_corpus(400, seed=0)
    assert len(documents) == 400
    assert documents == generic_corpus(400, seed=0)
    assert documents != generic_corpus(400, seed=1)
    allowed = set(string.printable) - set("\t\r\x0b\x0c")
    for document in documents:
        assert document and set(document) <= allowed
        assert "####" not in document and "=?" not in document and "Q:" not in document
    openings = {document.split(" ")[0] for document in documents}
    assert {"count", "copy:", "reverse:", "table:"} <= openings


def test_jsonl_round_trip_is_atomic(tmp_path):
    examples = MathTask().generate(20, seed=0) + [Example('Q: é "x"\nA: ', "a\n#### 1", "1")]
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(path, examples)
    assert read_jsonl(path) == examples
    write_jsonl(path, examples[:3])
    assert read_jsonl(path) == examples[:3]
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]


def test_write_jsonl_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, MathTask().generate(2, seed=0))
    before = path.read_text()

    def broken():
        yield Example("p", "c", "a")
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_jsonl(path, broken())
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "p", "completion": "c", "answer": "1"}', "{not json"], r"bad\.jsonl:2: invalid JSON"),
        (['{"prompt": "p", "completion": "c"}'], r"bad\.jsonl:1: missing key\(s\) \['answer'\]"),
        (["", '["a list"]'], r"bad\.jsonl:2: expected a JSON object"),
        (['{"prompt": "p", "completion": "c", "answer": 1}'], r"bad\.jsonl:1: .*'answer'.* strings"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_gsm8k_style_loader(tmp_path):
    records = [
        {
            "question": "Natalia sold clips to 48 friends in April, and half as many in May. How many?",
            "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72",
        },
        {"question": " Two? ", "answer": "It is 1+1 = <<1+1=2>>2.\n#### 2"},
        {"question": "Third", "answer": "#### 3"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_jsonl_dataset(path, "question", "answer")
    assert examples[0] == Example(
        prompt=f"Q: {records[0]['question']}\nA: ",
        completion="In May she sold 48/2 = 24 clips.\nAltogether 48+24 = 72.\n#### 72",
        answer="72",
    )
    assert examples[1].prompt == "Q: Two?\nA: "
    assert all(verify(e.completion, e.answer) == 1.0 for e in examples)
    assert load_jsonl_dataset(path, limit=2) == examples[:2]


def test_gsm8k_loader_errors_name_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"q": "x", "a": "1 #### 1"}) + "\n" + json.dumps({"q": "y", "a": "no mark"}) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:2: .*'####'"):
        load_jsonl_dataset(path, question_key="q", answer_key="a")
    with pytest.raises(ValueError, match=r"g\.jsonl:1: missing key\(s\) \['question', 'answer'\]"):
        load_jsonl_dataset(path)


def test_load_hf_dataset_without_datasets_package_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_hf_dataset("openai/gsm8k", "main", "test")


def test_real_math_domains_score_boxed_and_hash_answers_by_equivalence():
    """gsm8k rewards a reasoning model's \\boxed{} answer (math-verify) and keeps "####" answers."""
    task = get_task("gsm8k")
    assert task.verify("so the total is \\boxed{\\frac{144}{2}}", "72") == 1.0
    assert task.verify("48/2 = 24\n#### 72", "72") == 1.0
    assert task.verify("first \\boxed{72}, then I recheck: \\boxed{70}", "72") == 0.0  # the last box counts
    assert task.verify("no answer here", "72") == 0.0
    assert task.extract_answer("... \\boxed{1,000}") == "1,000"
    assert get_task("math").verify("\\boxed{72}", "72") == 0.0  # the synthetic domains read "####" only


def test_a_real_data_set_smaller_than_asked_says_so(capsys):
    from opdgeom.tasks.base import take

    examples = [Example("p", "c", str(i)) for i in range(3)]
    assert take("mbpp", examples, 5, "train") == examples
    assert "mbpp: 3 train examples available, 5 asked: using all 3" in capsys.readouterr().err
    assert take("mbpp", examples, 2, "train") == examples[:2] and capsys.readouterr().err == ""
