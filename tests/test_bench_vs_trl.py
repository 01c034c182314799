"""benchmarks/bench_vs_trl.py at its smallest: both sides run, the table comes out, ratios finite.
No timed assertions: only that the pairs ran and the numbers are numbers."""

import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("trl")

ARGS = ["--rounds", "1", "--steps", "2", "--prompts", "4", "--samples", "2", "--new-tokens", "8"]


def test_quick_mode_prints_both_sides_and_finite_ratios(repo, tmp_path):
    script = repo / "benchmarks" / "bench_vs_trl.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *ARGS, "--work", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| metric | ours | TRL | ours/TRL |" in out
    assert "ours vs TRL DistillationTrainer" in out and "ours vs TRL GRPOTrainer" in out
    for method in ("opd", "rlvr"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        ratios = [float(x) for x in re.findall(r"(\d+\.\d+|nan|inf)", row)]
        assert len(ratios) == 12 and all(math.isfinite(r) and r > 0 for r in ratios), row
    for label in ("end-to-end wall", "start-up", "sampling", "teacher scoring", "peak RSS"):
        assert label in out
    assert "GRPO std" in out and "full-vocabulary reverse KL" in out  # the differences are printed
    assert "commit " in out and "load average" in out


def test_gpu_flag_without_cuda_says_so(repo):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench_vs_trl.py"), "--gpu"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "bench_vs_trl --gpu: no CUDA device here; nothing measured" in proc.stdout
