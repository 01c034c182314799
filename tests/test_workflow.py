"""Real Snakemake runs: a dry run of the full study for every family preset, and the smoke study
end to end (real tiny models, real training, real safetensors checkpoints)."""

import json
import subprocess
import sys

import polars as pl
import pytest
from safetensors import safe_open

from conftest import REPO, run_snakemake

FAMILIES = sorted(p.stem for p in (REPO / "config" / "families").glob("*.yaml"))


snakemake = run_snakemake


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_plans_the_whole_study(family, tmp_path):
    proc = snakemake("-n", "--config", f"family={family}", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for rule in ("model", "train", "evaluate", "compare", "trajectory", "table1", "accuracy", "fig4a", "fig7c"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, f"{family}: no {rule} job planned"
    assert f"{tmp_path}/{family}/figures/table1.md" in out


@pytest.mark.workflow
def test_smoke_outputs_exist_and_are_sane(smoke):
    for name in ("table1.csv", "table1.md", "accuracy.png", "accuracy.pdf", "accuracy.csv", "fig4a.png", "fig5.csv"):
        assert (smoke / "figures" / name).stat().st_size > 0, name
    table = pl.read_csv(smoke / "figures" / "table1.csv")
    assert table["run"].to_list() == ["sft"]
    for column in ("matrices", "embedding", "lm_head", "1-D"):
        assert table[column].is_between(0.0, 1.0).all(), column
    # A training run moves almost every matrix weight by more than one bf16 step.
    assert table["matrices"][0] < 0.5


@pytest.mark.workflow
def test_smoke_teacher_beats_base(smoke):
    acc = pl.read_parquet(smoke / "eval" / "*.parquet")
    base = acc.filter(pl.col("ref") == "student")["accuracy"][0]
    teacher = acc.filter(pl.col("ref") == "teacher.math").sort("step")["accuracy"][-1]
    assert teacher > base, (teacher, base)


@pytest.mark.workflow
def test_smoke_checkpoints_are_bf16_hf_folders_with_manifest(smoke):
    manifest = json.loads((smoke / "runs" / "sft" / "manifest.json").read_text())
    steps = [c["step"] for c in manifest["checkpoints"]]
    assert steps == [0, 10, 20]
    assert manifest["checkpoints"][1]["tokens"] > 0 and manifest["checkpoints"][1]["loss"] > 0
    final = smoke / "runs" / "sft" / manifest["checkpoints"][-1]["path"]
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    with safe_open(final / "model.safetensors", "pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert dtypes == {"BF16"}
    init = (smoke / "runs" / "sft" / manifest["checkpoints"][0]["path"]).resolve()
    assert init == (smoke / "models" / "student").resolve()


@pytest.mark.workflow
@pytest.mark.parametrize("figure", ["table1", "fig4a"])
def test_smoke_rerun_has_nothing_to_do_and_one_figure_rebuilds_alone(smoke, figure):
    results = smoke.parent
    config = ["--configfile", "config/smoke.yaml", "--config", f"results_dir={results}", f"cache_dir={results}/cache"]
    proc = snakemake("-n", *config)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    target = next((smoke / "figures").glob(f"{figure}.*"))
    target.unlink()
    proc = snakemake("--profile", "profiles/local", figure, *config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert f"rule {figure}:" in out
    for rule in ("train", "model", "evaluate", "compare", "trajectory"):
        assert f"rule {rule}:" not in out, f"rebuilding {figure} reran {rule}"
    assert target.exists()


@pytest.mark.workflow
def test_report_bundles_every_figure(smoke, tmp_path):
    results = smoke.parent
    report = tmp_path / "report.zip"
    proc = snakemake(
        "--configfile", "config/smoke.yaml", "--config", f"results_dir={results}", f"cache_dir={results}/cache",
        "--report", str(report),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    names = zipfile.ZipFile(report).namelist()
    for figure in ("accuracy", "rotation", "fig4a", "fig5", "localization"):
        assert any(n.endswith(f"{figure}.png") for n in names), figure


@pytest.mark.workflow
def test_compare_rejects_a_truncated_checkpoint(smoke, tmp_path):
    import shutil

    good = smoke / "models" / "student"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "table.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "opdgeom", "compare", str(good), str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert str(bad / "model.safetensors") in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("family", ["qwen3-8b", "llama3-8b"])
def test_slurm_dry_run_trains_hub_families_on_whole_gpu_nodes(family, tmp_path, conda_env):
    config = ("--config", f"family={family}", f"results_dir={tmp_path}")
    proc = snakemake("-n", "-p", "--profile", "slurm", *config, env=conda_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_jobs = (proc.stdout + proc.stderr).split("rule train:")[1:]
    assert len(train_jobs) >= 20
    for job in train_jobs:
        assert "nodes=1, nproc_per_node=8, gpu=8, gpu_model=h100" in job.split("rule ")[0]
        threads = "OMP_NUM_THREADS=8 MKL_NUM_THREADS=8 OPENBLAS_NUM_THREADS=8"
        assert f"{threads} torchrun --standalone --nproc-per-node 8 -m opdgeom train --spec" in job
    # Evaluate jobs get the GPUs their memory plan was checked on, and its pass budget (issue 27).
    eval_jobs = (proc.stdout + proc.stderr).split("rule evaluate:")[1:]
    assert eval_jobs
    gpus = {"qwen3-8b": 1, "llama3-8b": 3}[family]
    for job in eval_jobs:
        assert f"gpu={gpus}, gpu_model=h100" in job.split("rule ")[0] and "--score-tokens 8192 --kv-cache-gb 40" in job
    # Every reference on every benchmark, with the benchmark's decoding (issue 25), from pinned sources.
    bench_jobs = (proc.stdout + proc.stderr).split("rule benchmark:")[1:]
    aime = [job for job in bench_jobs if "eval/bench/aime24/" in job.split("rule ")[0]]
    assert len(bench_jobs) == 3 * len(eval_jobs) and aime
    assert all("--max-new-tokens 8192 --k 16 --accuracy-temperature 0.6 --top-p 0.95" in job for job in aime)
    data_jobs = (proc.stdout + proc.stderr).split("rule benchmark_data:")[1:]
    assert len(data_jobs) == 3 and all("opdgeom benchmark-data --source" in job for job in data_jobs)


def test_dry_run_trains_tiny_families_in_one_process(tmp_path, conda_env):
    proc = snakemake("-n", "-p", "--profile", "slurm", "--config", f"results_dir={tmp_path}", env=conda_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_jobs = (proc.stdout + proc.stderr).split("rule train:")[1:]
    assert len(train_jobs) >= 20
    assert all(
        "nodes=1, nproc_per_node=1, gpu=1" in job and "python -m opdgeom train --spec" in job and "torchrun" not in job
        for job in train_jobs
    )
