"""The live monitor inside real training (issue 26): a tiny OPD run, on one process and on two gloo
ranks (FSDP2 row shards, nothing gathered), logs geometry at the checkpoint steps that equals the exact
float64 engine's on the checkpoints the run saved; the tracker (TensorBoard, read back with its own
reader) holds the same series as the log; a plain run stays free of channel alerts."""

import json
import os
import subprocess
import sys

import polars as pl
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opdgeom.geometry.live import SUMMARY
from opdgeom.geometry.trajectory import trajectory_table

from conftest import SETTINGS

pytestmark = pytest.mark.distributed

STEPS, EVERY, K = 6, 2, 4  # K = 4: a block of 8 columns against 32-wide matrices, so iteration matters
SR_RTOL, SIM_ATOL = 1e-6, 5e-3


def run(tiny, out, nproc: int) -> subprocess.CompletedProcess:
    spec = {"name": "mon", "method": "opd", "init": "student", "domain": "math",
            "train": {**SETTINGS, "steps": STEPS, "checkpoint_every": EVERY}}  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [
        *launcher, "-m", "opdgeom", "train", "--spec", json.dumps(spec), "--init", str(tiny["init"]),
        "--teacher", str(tiny["teacher"]), "--train-data", str(tiny["data"]), "--out", str(out),
        "--monitor-every", str(EVERY), "--monitor-k", str(K), "--tracker", "tensorboard",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("nproc", [1, 2])
def test_in_loop_geometry_equals_the_exact_engine_on_the_saved_checkpoints(tiny, tmp_path, nproc):
    out = tmp_path / "run"
    proc = run(tiny, out, nproc)
    table = pl.read_parquet(out / "monitor.parquet")
    assert sorted(table["step"].unique()) == [2, 4, 6]
    folders = {0: tiny["init"], **{s: out / f"step_{s:06d}" for s in (2, 4, 6)}}
    ref = 2  # the checkpoint nearest 20% of 6 steps
    for step in (4, 6):
        got = {
            (r["tensor"], r["metric"]): r["value"] for r in table.filter(pl.col("step") == step).iter_rows(named=True)
        }
        exact = trajectory_table({0: folders[0], ref: folders[ref], step: folders[step]}, K=K)
        exact = exact.filter(pl.col("kind") == "matrix")
        sims = exact.filter((pl.col("step") == ref) & (pl.col("metric") == "subspace_similarity_to_final"))
        ranks = exact.filter((pl.col("step") == step) & (pl.col("metric") == "stable_rank"))
        assert len(sims) == len(ranks) == 7  # one layer: q, k, v, o, gate, up, down
        for name, value in sims.select("tensor", "value").iter_rows():
            assert got[(name, "subspace_similarity_to_reference")] == pytest.approx(value, abs=SIM_ATOL), name
        for name, value in ranks.select("tensor", "value").iter_rows():
            assert got[(name, "stable_rank")] == pytest.approx(value, rel=SR_RTOL), name
    assert "geometry step 6:" in proc.stderr and "channel alert" not in proc.stderr
    # The tracker: the step series and the geometry summaries, as logged.
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    summary = table.filter((pl.col("tensor") == SUMMARY) & (pl.col("metric") == "stable_rank")).sort("step")
    logged = events.Scalars("geometry/stable_rank")
    assert [e.step for e in logged] == summary["step"].to_list()
    assert [e.value for e in logged] == pytest.approx(summary["value"].to_list(), rel=1e-6)
