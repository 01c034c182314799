"""The real-domain path end to end on CPU (issue 25), as a Snakemake run of config/smoke-real.yaml: the
tiny family reads GSM8K-, MBPP- and MATH-500-shaped records from pinned sources in a JSONL mirror
(written here: no network), rewards \\boxed{} / "####" answers by math-verify, trains on the code domain
with programs run in the sandbox, and scores every reference on a benchmark with avg@k."""

import json
import os

import polars as pl
import pytest

from opdgeom.tasks import MathTask, split

from conftest import REPO, run_snakemake

pytestmark = pytest.mark.workflow


def write_mirror(root):
    """GSM8K records from the synthetic math task ("... #### 7"), MATH-500 records with \\boxed{}
    solutions, and the MBPP fixture problems, in the mirror layout tasks/sources.py reads."""
    train, held_out = split(MathTask(), 300, 24, seed=3)
    gsm8k = {"train": train, "test": held_out}
    for name, examples in gsm8k.items():
        rows = [
            {"question": e.prompt.removeprefix("Q: ").removesuffix("\nA: "), "answer": e.completion} for e in examples
        ]
        write(root / "openai__gsm8k" / "main" / f"{name}.jsonl", rows)
    math500 = [{"problem": e.prompt, "solution": f"{e.completion.split('####')[0]}\\boxed{{{e.answer}}}",
                "answer": e.answer} for e in held_out[:8]]  # fmt: skip
    write(root / "HuggingFaceH4__MATH-500" / "default" / "test.jsonl", math500)
    mbpp = [json.loads(line) for line in (REPO / "tests" / "fixtures" / "mbpp" / "test.jsonl").read_text().splitlines()]
    for name in ("train", "test"):
        write(root / "google-research-datasets__mbpp" / "sanitized" / f"{name}.jsonl", mbpp)


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
    data = [json.loads(line) for line in (out / "data" / "mbpp" / "eval.jsonl").read_text().splitlines()]
    assert "```python" in data[0]["completion"] and "tests" in json.loads(data[0]["answer"])
    for ref in ("sft", "opd", "rlvr", "opd.programs"):
        table = pl.read_parquet(out / "eval" / f"{ref}.parquet")
        assert table["accuracy"].is_between(0, 1).all() and table["reverse_kl"].is_finite().all(), ref
    assert set(pl.read_parquet(out / "eval" / "opd.programs.parquet")["domain"]) == {"mbpp"}
    bench = pl.read_parquet(out / "eval" / "bench" / "math500" / "opd.parquet")
    assert (bench["k"] == 2).all() and bench["n"].to_list() == [8] * len(bench)
    assert all(all(c in (0.0, 0.5, 1.0) for c in row) for row in bench["correct"].to_list())  # shares of 2
    for figure in ("fig6.png", "fig6.math500.png", "accuracy.png"):
        assert (out / "figures" / figure).stat().st_size > 0, figure
