"""The real-domain path end to end on CPU (issue 25), as a Snakemake run of config/smoke-real.yaml: the
tiny family reads OpenR1-Math-, DeepScaleR-, MBPP- and MATH-500-shaped records from pinned sources in a
JSONL mirror (written here: no network), holds out and decontaminates, rewards \\boxed{} / "####" answers
by math-verify, trains on the code domain with programs run in the sandbox, and scores every reference
on a benchmark with avg@k."""

import json
import os

import polars as pl
import pytest

from opdgeom.tasks import MathTask, read_jsonl, split

from conftest import REPO, run_snakemake

pytestmark = pytest.mark.workflow


def write_mirror(root):
    """Synthetic math examples in the real data sets' layouts: OpenR1-Math records (a wrong trace, then
    the worked "... #### 7" solution with per-trace checks; every 10th has no verified trace, every 10th
    a trace over the 60-token cap), DeepScaleR records (problem, answer), MATH-500 records with \\boxed{}
    solutions (one of them copies a DeepScaleR problem: decontamination must drop that prompt), and the
    MBPP fixture problems, in the mirror layout tasks/sources.py reads."""
    demos, problems = split(MathTask(), 300, 24, seed=3)
    statement = [e.prompt.removeprefix("Q: ").removesuffix("\nA: ") for e in demos + problems]
    openr1 = []
    for i, e in enumerate(demos):
        trace = e.completion + (" so" * 20 if i % 10 == 5 else "")
        checks = {"correctness_math_verify": [False, i % 10 != 3], "is_reasoning_complete": [True, True]}
        openr1.append({"problem": statement[i], "answer": e.answer, "generations": ["0 #### 0", trace], **checks})
    write(root / "open-r1__OpenR1-Math-220k" / "default" / "train.jsonl", openr1)
    deepscaler = [{"problem": statement[300 + i], "answer": e.answer} for i, e in enumerate(problems[:16])]
    write(root / "agentica-org__DeepScaleR-Preview-Dataset" / "default" / "train.jsonl", deepscaler)
    math500 = [{"problem": statement[316 + i], "solution": f"{e.completion.split('####')[0]}\\boxed{{{e.answer}}}",
                "answer": e.answer} for i, e in enumerate(problems[16:])]  # fmt: skip
    math500.append({"problem": statement[300], "solution": "\\boxed{0}", "answer": problems[0].answer})
    write(root / "HuggingFaceH4__MATH-500" / "default" / "test.jsonl", math500)
    mbpp = [json.loads(line) for line in (REPO / "tests" / "fixtures" / "mbpp" / "test.jsonl").read_text().splitlines()]
    for name, rows in (("train", mbpp[:3]), ("test", mbpp[3:])):  # disjoint, or decontamination empties train
        write(root / "google-research-datasets__mbpp" / "sanitized" / f"{name}.jsonl", rows)


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_suffix(".revision").write_text("0" * 40)


def test_the_real_domain_smoke_study_runs_end_to_end(tmp_path):
    mirror, results = tmp_path / "mirror", tmp_path / "results"
    write_mirror(mirror)
    env = {**os.environ, "OPDGEOM_DATA_MIRROR": str(mirror), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_snakemake(
        "--profile", "profiles/local", "--configfile", "config/smoke-real.yaml",
        "--config", f"results_dir={results}", f"cache_dir={results}/cache", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = results / "tiny-qwen3"
    log = (out / "logs" / "data" / "competition_math.log").read_text()
    assert "30 skipped: no verified complete trace" in log and "30 dropped as longer than 60 tokens" in log, log
    assert "16 demonstrations held out" in log and "1 of 16 left out for sharing an 8-gram" in log, log
    sft, train, held = (read_jsonl(out / "data" / "competition_math" / f"{n}.jsonl") for n in ("sft", "train", "eval"))
    assert len(sft) == 300 - 30 - 30 - 16 and len(train) == 15 and len(held) == 16
    assert not {e.prompt for e in held} & {e.prompt for e in sft} and all(e.completion == "" for e in train)
    data = [json.loads(line) for line in (out / "data" / "mbpp" / "eval.jsonl").read_text().splitlines()]
    assert "```python" in data[0]["completion"] and "tests" in json.loads(data[0]["answer"])
    for ref in ("sft", "opd", "rlvr", "opd.programs"):
        table = pl.read_parquet(out / "eval" / f"{ref}.parquet")
        assert table["accuracy"].is_between(0, 1).all() and table["reverse_kl"].is_finite().all(), ref
    assert set(pl.read_parquet(out / "eval" / "opd.programs.parquet")["domain"]) == {"mbpp"}
    bench = pl.read_parquet(out / "eval" / "bench" / "math500" / "opd.parquet")
    assert (bench["k"] == 2).all() and bench["n"].to_list() == [9] * len(bench)
    assert all(all(c in (0.0, 0.5, 1.0) for c in row) for row in bench["correct"].to_list())  # shares of 2
    for figure in ("fig6.png", "fig6.math500.png", "accuracy.png"):
        assert (out / "figures" / figure).stat().st_size > 0, figure
