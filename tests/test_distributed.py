"""Data-parallel training for real: two CPU ranks (torchrun, gloo, FSDP2) against one process with
the same global batch and seed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from opdgeom.train.checkpoint import full_trainer_state

from conftest import SETTINGS

pytestmark = pytest.mark.distributed


def _cmd(tiny, spec, out, nproc: int, extra=()) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [
        *launcher, "-m", "opdgeom", "train", "--spec", json.dumps(spec), "--init", str(tiny["init"]),
        "--teacher", str(tiny["teacher"]), "--train-data", str(tiny["data"]), "--out", str(out), *extra,
    ]  # fmt: skip


ENV = {"OMP_NUM_THREADS": "1", **os.environ}


def dp_spec(method: str, steps: int, checkpoint_every: int = 2, **options) -> dict:
    train = {**SETTINGS, "steps": steps, "checkpoint_every": checkpoint_every}
    return {"name": "dp", "method": method, "init": "student", "domain": "math", "train": train, **options}


def _train(tiny, spec, out, nproc: int, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(tiny, spec, out, nproc, extra), capture_output=True, text=True, env=ENV)


def test_two_ranks_killed_mid_run_resume_from_their_shards_to_identical_weights(tiny, tmp_path):
    """SIGKILL to every process of a 2-rank job after its first checkpoint; the rerun resumes from the
    sharded DCP state (each rank wrote, and reads, only its own shard) to the uninterrupted run's weights."""
    spec = dp_spec("opd", steps=12, checkpoint_every=3, token_mask={"select": "random", "keep": 0.5})
    straight = _train(tiny, spec, tmp_path / "straight", nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]

    resumed = tmp_path / "resumed"
    cmd = _cmd(tiny, spec, resumed, nproc=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (resumed / "trainer_state" / "meta.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert not (resumed / "manifest.json").exists(), "the job finished before it could be killed"
    again = _train(tiny, spec, resumed, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step" in again.stderr

    metadata = dcp.FileSystemReader(resumed / "trainer_state").read_metadata().state_dict_metadata
    exp_avg = [k for k in metadata if k.startswith("optimizer.state.") and k.endswith(".exp_avg")]
    assert exp_avg and all(len(metadata[k].chunks) == 2 for k in exp_avg), "optimizer state not saved per rank"
    assert sorted(p.name for p in (resumed / "trainer_state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    a, b = full_trainer_state(tmp_path / "straight"), full_trainer_state(resumed)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"fp32 weights differ after resume: {name}"


def test_two_ranks_match_one_process_on_the_same_global_batch(tiny, tmp_path):
    spec = dp_spec("sft", steps=4)
    one = _train(tiny, spec, tmp_path / "one", nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tiny, spec, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]

    a = full_trainer_state(tmp_path / "one")["model"]
    b = full_trainer_state(tmp_path / "two")["model"]
    assert a.keys() == b.keys()
    init = load_file(tiny["init"] / "model.safetensors")
    for name in a:
        moved = (a[name] - init[name].float()).abs().max()
        diff = (a[name] - b[name]).abs().max()
        # Same update up to float summation order (token sums split over ranks, gradient all-reduce).
        assert diff <= 1e-5 + 1e-3 * moved, (name, float(diff), float(moved))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [0, 2, 4]
    assert (tmp_path / "two" / "step_000004" / "model.safetensors").exists()


def test_two_ranks_run_on_policy_distillation(tiny, tmp_path):
    """OPD with top-KL selection under small micro-batches, as the hub families train: the sharded
    teacher and the top-KL scorer run several passes per step (rows of unequal lengths per rank, the
    case that deadlocked, are pinned down in test_microbatch.py)."""
    spec = dp_spec("opd", steps=2, token_mask={"select": "top", "keep": 0.5})
    spec["train"]["micro_batch_tokens"] = 24
    two = _train(tiny, spec, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "micro_batches=" in two.stderr
    final = load_file(tmp_path / "two" / "step_000002" / "model.safetensors")
    init = load_file(tiny["init"] / "model.safetensors")
    assert any(not torch.equal(final[k], init[k]) for k in final)


def test_two_ranks_sample_from_a_lagged_copy(tiny, tmp_path):
    """Off-policy control under FSDP: the lagged copy is sharded like the policy, refreshed from
    each rank's own shards every `lag` steps, and saved (sharded) with the trainer state."""
    spec = dp_spec("opd", steps=3, behaviour={"policy": "lagged", "lag": 2})
    two = _train(tiny, spec, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    state = full_trainer_state(tmp_path / "two")
    assert state["method"]["refreshed_at"] == 2  # steps 0 and 1 sampled from step 0, step 2 from step 2
    lagged = state["method"]["weights"]
    at_step_2 = load_file(tmp_path / "two" / "step_000002" / "model.safetensors")
    init = load_file(tiny["init"] / "model.safetensors")
    assert any(not torch.equal(at_step_2[k], init[k]) for k in at_step_2)
    for name, weight in at_step_2.items():  # the checkpoint is the bf16 copy of the same weights
        assert torch.equal(lagged[name].to(weight.dtype), weight), name


def test_two_ranks_train_inside_a_subspace(tiny, tmp_path):
    """Subspace-projected training under FSDP: each rank projects the rows it holds; the result is the
    one-process run's, and the cumulative update stays inside the subspace."""
    reference = {**dp_spec("sft", steps=2), "name": "ref"}
    ref = _train(tiny, reference, tmp_path / "ref", nproc=1)
    assert ref.returncode == 0, ref.stderr[-3000:]
    basis = tmp_path / "basis.safetensors"
    cmd = [sys.executable, "-m", "opdgeom", "basis", str(tiny["init"]), str(tmp_path / "ref" / "step_000002")]
    subprocess.run([*cmd, "--rank", "4", "--out", str(basis)], check=True)
    extra = ["--projection-basis", str(basis)]
    spec = dp_spec("sft", steps=4, projection={"mode": "update", "rank": 4, "reference": "ref", "at_fraction": 0.5})
    runs = {n: _train(tiny, spec, tmp_path / f"p{n}", nproc=n, extra=extra) for n in (1, 2)}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (full_trainer_state(tmp_path / f"p{n}")["model"] for n in (1, 2))
    init = load_file(tiny["init"] / "model.safetensors")
    for name in a:
        moved = (a[name] - init[name].float()).abs().max()
        assert (a[name] - b[name]).abs().max() <= 1e-5 + 1e-3 * moved, name
    for n in (1, 2):
        energy = json.loads((tmp_path / f"p{n}" / "manifest.json").read_text())["projection"]["energy_outside"]
        assert energy["total"] < 1e-10, (n, energy["total"])
