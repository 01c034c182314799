"""benchmarks/gpu_smoke.py, the cluster path's GPU smoke run, on CPU: the same jobs at tiny shapes."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


def test_cpu_smoke_trains_two_ranks_and_evaluates(repo, tmp_path):
    script = [sys.executable, str(repo / "benchmarks" / "gpu_smoke.py")]
    cmd = [*script, "--cpu-smoke", "--out", str(tmp_path), "--max-new-tokens", "16", "--micro-batch-tokens", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "world=2" in proc.stdout and "step 3/3" in proc.stdout
    assert "micro_batches=" in proc.stdout  # several passes per step, as many on both ranks
    assert (tmp_path / "run" / "manifest.json").exists() and (tmp_path / "eval.parquet").exists()


def test_without_a_gpu_it_says_so_and_fails(repo):
    """Asked to measure on a machine without CUDA: nothing is measured, and the exit code says so."""
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu_smoke.py")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stdout
