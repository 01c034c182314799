"""A real domain's three roles from pinned sources (tasks.roles, tasks.records, tasks.decontaminate):
verified long-CoT demonstrations, separate policy-gradient prompts, a held-out split disjoint from
training, prompt templates, and 8-gram decontamination against benchmarks, every count in the report."""

import dataclasses
import json

import pytest

from opdgeom.tasks.base import Example
from opdgeom.tasks.decontaminate import Decontaminator, ngrams, words
from opdgeom.tasks.records import SkipRecord, verified_trace_mapper
from opdgeom.tasks.roles import DomainSources, real_splits
from opdgeom.tasks.sources import Source, SourceError, load_source, mirror_path, revision_path

SHA = "0123456789abcdef0123456789abcdef01234567"
BOXED = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def trace_record(i: int, correct=(False, True), complete=(True, True)) -> dict:
    """An OpenR1-Math-shaped record: two traces with per-trace checks."""
    # every 8 words of one problem hold its own number: distinct problems share no 8-gram
    problem = " ".join(f"{w} {i}" for w in ("Find", "the", "ordered", "pairs", "whose", "sum", "is")) + "."
    return {
        "problem": problem,
        "answer": str(i),
        "generations": [f"<think>wrong {i}</think> \\boxed{{{i + 1}}}", f"<think>pairs {i}</think> \\boxed{{{i}}}"],
        "correctness_math_verify": list(correct),
        "is_reasoning_complete": list(complete),
    }


def prompt_record(i: int) -> dict:
    """A DeepScaleR-shaped record: a problem, its answer, a short solution."""
    problem = " ".join(f"{w} {i}" for w in ("Compute", "the", "remainder", "of", "cubes", "modulo", "seven"))
    return {"problem": problem + "?", "answer": "1"}


def write(mirror, source: Source, rows) -> None:
    path = mirror_path(source, mirror)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    revision_path(path).write_text(SHA)


SFT = Source.from_dict(
    {"dataset": "open-r1/OpenR1-Math-220k", "config": "default", "split": "train", "revision": SHA,
     "mapper": "verified_trace", "prompt_template": BOXED},
    "sft",
)  # fmt: skip
PROMPTS = Source.from_dict(
    {"dataset": "agentica-org/DeepScaleR-Preview-Dataset", "split": "train", "revision": SHA,
     "fields": {"prompt": "problem", "answer": "answer"}, "prompt_template": BOXED},
    "prompts",
)  # fmt: skip
BENCH = Source.from_dict(
    {"dataset": "HuggingFaceH4/MATH-500", "split": "test", "revision": SHA,
     "fields": {"prompt": "problem", "answer": "answer"}, "prompt_template": BOXED},
    "bench",
)  # fmt: skip


def test_verified_trace_takes_the_first_correct_complete_trace_and_skips_the_rest():
    mapper = verified_trace_mapper(SFT)
    example = mapper(trace_record(3))
    assert example == Example(trace_record(3)["problem"], trace_record(3)["generations"][1], "3")
    # the correct trace was cut off (not complete): no demonstration, counted as skipped
    with pytest.raises(SkipRecord, match="no verified complete trace"):
        mapper(trace_record(3, complete=(True, False)))
    with pytest.raises(SkipRecord):
        mapper(trace_record(3, correct=(False, False)))
    bad = {**trace_record(3), "correctness_math_verify": [True]}
    with pytest.raises(ValueError, match="2 generations but 1 correctness_math_verify"):
        mapper(bad)
    no_flags = {k: v for k, v in trace_record(3, correct=(True, True)).items() if k != "is_reasoning_complete"}
    assert mapper(no_flags).completion == trace_record(3)["generations"][0]  # no flags: every trace complete


def test_prompt_template_is_validated_applied_and_counted_in_lengths(tmp_path):
    for bad in ("no placeholder", "{prompt} and {other}", "{prompt} {"):
        with pytest.raises(SourceError, match="prompt_template"):
            Source.from_dict({"dataset": "a/b", "split": "t", "fields": {"prompt": "p"}, "prompt_template": bad}, "s")
    write(tmp_path, SFT, [trace_record(i) for i in (1, 22, 333, 4444)] + [trace_record(9, correct=(False, False))])
    loaded = load_source(SFT, mirror_dir=tmp_path)
    assert loaded.examples[0].prompt.endswith("within \\boxed{}.") and loaded.examples[0].prompt.startswith("Find")
    assert loaded.problems[0] == trace_record(1)["problem"]  # the statement alone, for decontamination
    assert loaded.skipped == {"no verified complete trace": 1} and "1 skipped: no verified" in loaded.summary()
    shortest = min(len(e.prompt + e.completion) for e in loaded.examples)
    cut = dataclasses.replace(SFT, max_tokens=shortest)
    loaded = load_source(cut, mirror_dir=tmp_path)  # characters of the templated prompt + the trace
    assert len(loaded.examples) == 1 and loaded.too_long == 3
    assert f"3 dropped as longer than {shortest} tokens" in loaded.summary()


def test_eight_gram_decontamination():
    bench = [r"Let $f(x) = x^2 + 3$. Find the value of $f(2)$ when evaluated at the point.", "What is 1+1?"]
    clean = Decontaminator(bench)
    # punctuation, case and LaTeX markup do not hide a copy of 8 consecutive words
    assert clean.contaminated(r"Let f(x)=x^2+3. FIND the value of f(2) when evaluated at the point, please")
    assert clean.contaminated("Solve: f(x) = x^2 + 3. Find it")  # 8 words in a row, from the middle
    assert not clean.contaminated("Solve: f(x) = x^2 - 3. Find it")  # signs are words: another problem
    assert not clean.contaminated("Let g(x) = x^3 - 1. Find the derivative of g at zero, and then stop.")
    assert clean.contaminated("what is 1 + 1") and not clean.contaminated("What is 1-1?")  # short: compared whole
    assert words("$\\frac{1}{2}$, Done!") == ["frac", "1", "2", "done"]
    assert len(ngrams("one two three four five six seven eight nine")) == 2


def test_real_splits_holds_out_demonstrations_and_decontaminates_training(tmp_path):
    n = 12
    write(tmp_path, SFT, [trace_record(i) for i in range(n)] + [trace_record(99, correct=(False, False))])
    prompts = [prompt_record(i) for i in range(10)]
    prompts.append({"problem": trace_record(5)["problem"], "answer": "5"})  # a copy of a demonstration's problem
    write(tmp_path, PROMPTS, prompts)
    write(tmp_path, BENCH, [{"problem": prompt_record(7)["problem"], "answer": "1"}])  # DeepScaleR row 7 leaks
    import os

    os.environ["OPDGEOM_DATA_MIRROR"] = str(tmp_path)
    try:
        splits = real_splits(
            "competition_math", DomainSources.from_roles({"sft": SFT, "prompts": PROMPTS}, "t"),
            n_train=100, n_eval=3, seed=0, benchmarks={"math500": BENCH},
        )  # fmt: skip
        again = real_splits(
            "competition_math", DomainSources.from_roles({"sft": SFT, "prompts": PROMPTS}, "t"),
            n_train=100, n_eval=3, seed=0, benchmarks={"math500": BENCH},
        )  # fmt: skip
    finally:
        del os.environ["OPDGEOM_DATA_MIRROR"]
    assert splits == again  # a pure function of (sources, seed)
    held = {e.prompt for e in splits.eval}
    assert len(splits.eval) == 3 and len(splits.sft) == n - 3 and not held & {e.prompt for e in splits.sft}
    assert all(e.completion.startswith("<think>") for e in splits.sft + splits.eval)  # verified traces
    bench_prompt = BENCH.format_prompt(prompt_record(7)["problem"])
    assert bench_prompt not in {e.prompt for e in splits.train}
    copy = PROMPTS.format_prompt(trace_record(5)["problem"])
    # the prompt that copies demonstration 5 stays only if demonstration 5 was not held out
    assert (copy in {e.prompt for e in splits.train}) == (copy not in held)
    assert len(splits.train) == 10 - (copy in held) and all(e.completion == "" for e in splits.train)
    report = "\n".join(splits.report)
    assert "1 skipped: no verified complete trace" in report and "3 demonstrations held out" in report
    assert f"prompts: {1 + (copy in held)} of 11 left out for sharing an 8-gram" in report
    assert "decontaminating against benchmark math500: 1 problems" in report


def test_domain_sources_roles_and_errors():
    both = DomainSources.from_roles({"train": PROMPTS, "eval": BENCH}, "t")
    assert both.sft == both.prompts == PROMPTS and both.eval == BENCH
    with pytest.raises(SourceError, match="no source for prompts"):
        DomainSources.from_roles({"sft": SFT}, "domain x")
    with pytest.raises(SourceError, match=r"unknown role\(s\) \['test'\]"):
        DomainSources.from_roles({"train": SFT, "test": SFT}, "domain x")


def test_a_role_left_empty_is_an_error(tmp_path, monkeypatch):
    write(tmp_path, SFT, [trace_record(0, correct=(False, False))] * 3)
    write(tmp_path, PROMPTS, [prompt_record(0)])
    monkeypatch.setenv("OPDGEOM_DATA_MIRROR", str(tmp_path))
    with pytest.raises(ValueError, match="no sft, eval examples left.*3 skipped: no verified complete trace"):
        real_splits("competition_math", DomainSources.from_roles({"sft": SFT, "prompts": PROMPTS}, "t"), 5, 1, 0)
