"""The training loop for real on a tiny model: resume after SIGKILL, non-finite stops, projection,
behaviour policies and every method's step."""

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdgeom.manifest import read_manifest
from opdgeom.models import load_model
from opdgeom.spec import RunSpec
from opdgeom.train.checkpoint import (
    TrainerStateError,
    full_trainer_state,
    load_trainer_state,
    read_meta,
    save_trainer_state,
)
from opdgeom.train.distributed import SINGLE
from opdgeom.train.loop import NonFiniteError, lr_lambda
from opdgeom.train.projection import SubspaceProjection
from opdgeom.train.run import train_run

from conftest import SETTINGS


def run_spec(method="opd", **options) -> RunSpec:
    settings = {**SETTINGS, **options.pop("train", {})}
    return RunSpec.from_json(
        {"name": "t", "method": method, "init": "student", "domain": "math", "train": settings, **options}
    )


@pytest.mark.parametrize(
    "spec",
    [
        run_spec("sft"),
        run_spec("opd"),
        run_spec("rlvr"),
        run_spec("mix", alpha=0.25),
        run_spec("opd", token_mask={"select": "top", "keep": 0.25}),
        run_spec("opd", behaviour={"policy": "anchor"}, train={"rho_clip": 10}),
        run_spec("opd", behaviour={"policy": "lagged", "lag": 2}),
    ],
    ids=["sft", "opd", "rlvr", "mix", "topkl", "offanchor", "offlag"],
)
def test_every_method_trains_and_writes_bf16_checkpoints(tiny, tmp_path, spec):
    manifest = train_run(spec, tiny["init"], tiny["data"], tmp_path / "run", seed=0, teacher=tiny["teacher"])
    checkpoints = read_manifest(manifest)
    assert [c["step"] for c in checkpoints] == [0, 3, 6]
    assert Path(checkpoints[0]["path"]).resolve() == tiny["init"].resolve()
    w0 = load_file(Path(checkpoints[0]["path"]) / "model.safetensors")
    w1 = load_file(Path(checkpoints[-1]["path"]) / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in w1.values())
    name = "model.layers.0.mlp.down_proj.weight"
    if spec.method == "rlvr":
        # An untrained model never earns a reward: every GRPO advantage is 0, so AdamW leaves the
        # weights exactly where they were (a silent update here would be a bug).
        assert torch.equal(w0[name], w1[name])
    else:
        assert not torch.equal(w0[name], w1[name]), "weights did not move"


def _train_cmd(tiny, spec, out) -> list[str]:
    return [
        sys.executable, "-m", "opdgeom", "train", "--spec", json.dumps(spec.to_json()), "--init", str(tiny["init"]),
        "--teacher", str(tiny["teacher"]), "--train-data", str(tiny["data"]), "--out", str(out), "--seed", "3",
    ]  # fmt: skip


def test_resume_after_sigkill_gives_bitwise_identical_weights(tiny, tmp_path):
    # Lagged behaviour + random token masks: the resumed run must restore model, optimizer, schedule,
    # the stale behaviour copy, and replay the same data and random draws.
    spec = run_spec(
        "opd", behaviour={"policy": "lagged", "lag": 4}, token_mask={"select": "random", "keep": 0.5},
        train={"steps": 40, "checkpoint_every": 5},
    )  # fmt: skip
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(tiny, spec, straight), check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_train_cmd(tiny, spec, resumed), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (resumed / "step_000010").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (resumed / "manifest.json").exists()
    log = subprocess.run(_train_cmd(tiny, spec, resumed), check=True, capture_output=True, text=True).stderr
    assert "resuming from step" in log

    a = full_trainer_state(straight)
    b = full_trainer_state(resumed)
    assert read_meta(straight)["step"] == read_meta(resumed)["step"] == 40
    assert sorted(p.name for p in (resumed / "trainer_state").iterdir()) == [".metadata", "__0_0.distcp", "meta.json"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"fp32 weights differ: {name}"
    final_a = load_file(straight / "step_000040" / "model.safetensors")
    final_b = load_file(resumed / "step_000040" / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_a_finished_runs_json_meta_restores_schedule_and_learning_rate(tiny, tmp_path):
    spec = run_spec("sft")
    train_run(spec, tiny["init"], tiny["data"], tmp_path / "run", seed=0)
    meta = read_meta(tmp_path / "run")
    assert meta["step"] == spec.train.steps and [r["step"] for r in meta["records"]] == [3, 6]
    model = load_model(tiny["init"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr)
    factor = lr_lambda(spec.train.warmup_steps, spec.train.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    load_trainer_state(tmp_path / "run", model, optimizer, NoState())
    scheduler.load_state_dict(meta["scheduler"])
    final_lr = spec.train.lr * factor(spec.train.steps)
    assert final_lr != spec.train.lr * factor(0)
    assert scheduler.get_last_lr() == [final_lr] and scheduler.state_dict() == meta["scheduler"]
    assert optimizer.param_groups[0]["lr"] == final_lr, "the optimizer's learning rate was not restored"


class NoState:
    """SFT's method state: nothing."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        assert state == {}


class StepState:
    """A method state with one non-tensor entry, as a lagged copy's refresh step."""

    def __init__(self, refreshed_at=None):
        self.refreshed_at = refreshed_at

    def state_dict(self) -> dict:
        return {"refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict) -> None:
        self.refreshed_at = state["refreshed_at"]


class Planted:
    """What a writer of the shared file system could plant: unpickling it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_pickled_meta_from_the_old_format_is_refused_unread(tiny, tmp_path):
    run = tmp_path / "run"
    train_run(run_spec("sft"), tiny["init"], tiny["data"], run, seed=0)
    (run / "trainer_state" / "meta.json").unlink()
    torch.save(Planted(tmp_path / "ran"), run / "trainer_state" / "meta.pt")
    expected = (
        r"trainer_state/meta\.pt: trainer metadata in the old pickle format.*runs whatever code.*Delete .*trainer_state"
    )
    with pytest.raises(TrainerStateError, match=expected):
        train_run(run_spec("sft"), tiny["init"], tiny["data"], run, seed=0)
    assert not (tmp_path / "ran").exists()


def test_pickles_planted_in_the_dcp_state_are_refused_unrun(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_trainer_state(tmp_path, model, optimizer, StepState(3), {"step": 1}, SINGLE)
    fresh, restored = torch.nn.Linear(2, 2), StepState()
    load_trainer_state(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), restored)
    assert restored.refreshed_at == 3 and torch.equal(fresh.weight, model.weight)

    save_trainer_state(tmp_path, model, optimizer, StepState(Planted(tmp_path / "ran")), {"step": 1}, SINGLE)
    with pytest.raises(TrainerStateError, match=r"entry method\.refreshed_at is not plain data.*GLOBAL exec"):
        load_trainer_state(tmp_path, model, optimizer, StepState())
    index = tmp_path / "trainer_state" / ".metadata"
    index.write_bytes(pickle.dumps(Planted(tmp_path / "ran")))
    with pytest.raises(TrainerStateError, match=r"\.metadata: names builtins\.exec"):
        full_trainer_state(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_non_finite_loss_stops_without_a_checkpoint(tiny, tmp_path):
    spec = run_spec("sft", train={"lr": float("inf")})
    with pytest.raises(NonFiniteError):
        train_run(spec, tiny["init"], tiny["data"], tmp_path / "run", seed=0)
    assert not list((tmp_path / "run").glob("step_*"))
    assert not (tmp_path / "run" / "manifest.json").exists()


def _basis(tiny, tmp_path, rank: int = 4) -> Path:
    """The subspace file `opdgeom basis` writes from a reference run's first checkpoint."""
    ref = train_run(run_spec("sft"), tiny["init"], tiny["data"], tmp_path / "ref", seed=0)
    out = tmp_path / "basis.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "opdgeom",
        "basis",
        str(tiny["init"]),
        read_manifest(ref)[1]["path"],
        "--rank",
        str(rank),
    ]
    subprocess.run([*cmd, "--out", str(out)], check=True)
    return out


@pytest.mark.parametrize(
    "mode, inside",
    [
        # "update" keeps the cumulative update in the subspace to float tolerance.
        ("update", lambda outside: outside < 1e-10),
        # "gradient" leaks through AdamW's per-coordinate scaling: measured, neither 0 nor all.
        ("gradient", lambda outside: 0.0 < outside < 1.0),
    ],
)
def test_projection_energy_outside_the_subspace(tiny, tmp_path, mode, inside):
    spec = run_spec("opd", projection={"mode": mode, "rank": 4, "reference": "ref", "at_fraction": 0.5})
    manifest = train_run(
        spec, tiny["init"], tiny["data"], tmp_path / "run", seed=0, teacher=tiny["teacher"],
        projection_basis=_basis(tiny, tmp_path),
    )  # fmt: skip
    energy = json.loads(manifest.read_text())["projection"]["energy_outside"]
    assert inside(energy["total"]), energy


def test_projection_by_hand_on_a_matrix():
    model = torch.nn.Linear(6, 3, bias=False)
    v_nk = torch.linalg.qr(torch.randn(6, 2)).Q
    proj = SubspaceProjection(model, {"weight": v_nk}, mode="update")
    with torch.no_grad():
        model.weight.add_(torch.randn(3, 6))
    proj.after_update(model)
    dw = (model.weight - proj.w0["weight"]).double()
    assert torch.allclose(dw, dw @ (v_nk @ v_nk.T).double(), atol=1e-6)
    assert proj.energy_outside()["total"] < 1e-10

    proj_g = SubspaceProjection(model, {"weight": v_nk}, mode="gradient")
    model.weight.grad = torch.randn(3, 6)
    expected = model.weight.grad @ v_nk @ v_nk.T
    proj_g.after_backward(model)
    assert torch.allclose(model.weight.grad, expected, atol=1e-6)


def test_load_model_keeps_fp32_master_weights(tiny):
    model = load_model(tiny["init"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_changed_run_never_mixes_old_checkpoints(tiny, tmp_path):
    out = tmp_path / "run"
    train_run(run_spec("sft"), tiny["init"], tiny["data"], out, seed=0)
    (out / ".step_000099.tmp-dead").mkdir()  # what a job killed while saving leaves behind
    changed = run_spec("sft", train={"steps": 4, "checkpoint_every": 4})
    manifest = train_run(changed, tiny["init"], tiny["data"], out, seed=0)
    assert [c["step"] for c in read_manifest(manifest)] == [0, 4]
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000004"]
    assert not list(out.glob(".*.tmp*"))


def test_one_process_bf16_fsdp_with_checkpointing_and_micro_batches(tiny, tmp_path):
    """The hub families' precision path in one process: FSDP2 over a one-rank group with bf16
    compute, per-layer activation checkpointing, micro-batches, a bf16 lagged copy, DCP state."""
    settings = {"mixed_precision": "bf16", "activation_checkpointing": True, "micro_batch_tokens": 48}
    spec = run_spec("opd", behaviour={"policy": "lagged", "lag": 2}, train={**settings, "rho_clip": 10})
    proc = subprocess.run(_train_cmd(tiny, spec, tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "micro_batches=" in proc.stderr
    final = load_file(tmp_path / "run" / "step_000006" / "model.safetensors")
    start = load_file(tiny["init"] / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in final.values())
    assert any(not torch.equal(final[k], start[k]) for k in final), "weights did not move"
    state = full_trainer_state(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in state["model"].values()), "master weights must stay fp32"
    assert {t.dtype for t in state["method"]["weights"].values()} == {torch.bfloat16}, "lagged copy in bf16"


def test_export_in_several_safetensors_shards_loads_as_the_same_model(tiny, tmp_path):
    """The 8B export path (several shards + index) at tiny size: transformers reads it back whole."""
    from opdgeom.models import load_tokenizer
    from opdgeom.train.checkpoint import export_hf
    from opdgeom.train.distributed import SINGLE

    model, tokenizer = load_model(tiny["init"]), load_tokenizer(tiny["init"])
    export_hf(model, tokenizer, tmp_path / "out", SINGLE, shard_bytes=4 << 10)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    again = load_model(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor.to(torch.bfloat16).float()), name
