"""benchmarks/gpu_smoke.py, the GPU machine's end-to-end check, runs its whole path on CPU: two gloo
ranks of OPD with micro-batches and the sharded teacher, then a phased evaluate job with the teacher
(so that the script a GPU machine runs as-is has run here before)."""

import os
import subprocess
import sys

import polars as pl
import pytest

from conftest import REPO

pytestmark = pytest.mark.distributed


def test_gpu_smoke_runs_train_and_evaluate_on_cpu(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    }
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--cpu-smoke", "--max-new-tokens", "16", "--score-tokens", "64",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| train | 0 |" in proc.stdout and "| evaluate | 0 |" in proc.stdout
    assert proc.stdout.count("step ") >= 3 and "world=2" in proc.stdout
    table = pl.read_parquet(tmp_path / "eval.parquet")
    assert table["step"].to_list()[-1] == 3  # the final checkpoint was evaluated
    assert (table["reverse_kl"] > 0).all() and (table["samples"] == 2).all() and (table["k"] == 4).all()
