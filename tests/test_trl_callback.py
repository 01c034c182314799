"""The live monitor as a TrainerCallback inside a real TRL run: a tiny GRPO run on CPU logs, through the
Trainer's own reporting (state.log_history), geometry at the checkpoint steps that equals the exact
float64 engine's on the checkpoint-N folders the run saved (fp32, so checkpoint_dtype=None)."""

import dataclasses
import logging
import os

import polars as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opdgeom.diagnose.callback import GeometryCallback
from opdgeom.geometry.live import METRICS, SUMMARY
from opdgeom.geometry.trajectory import trajectory_table
from opdgeom.models import build_model, save_model
from opdgeom.tasks import MathTask, split
from opdgeom.tokenizer import build_char_tokenizer

from conftest import TINY

os.environ["HF_HUB_OFFLINE"] = "1"
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS, SAVE, K = 6, 2, 4  # K = 4: a block of 8 columns against 32-wide matrices, so iteration matters
SR_RTOL, SIM_ATOL = 1e-6, 5e-3


def digit_share(completions, **kwargs) -> list[float]:
    """The share of digits in each completion, ties broken by character codes (so that no group of
    completions scores all alike, which would make every advantage zero and the step a no-op)."""
    return [(sum(c.isdigit() for c in text) + sum(map(ord, text)) / 1e4) / max(len(text), 1) for text in completions]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    tok = build_char_tokenizer()
    save_model(build_model(TINY, tok, seed=0), tok, root / "init", dtype=torch.float32)
    train, _ = split(MathTask(), 32, 4, seed=0)
    dataset = datasets.Dataset.from_list([{"prompt": example.prompt} for example in train])
    config = trl.GRPOConfig(
        output_dir=str(root / "out"), max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
        per_device_train_batch_size=4, num_generations=2, max_completion_length=8, temperature=1.0,
        save_strategy="steps", save_steps=SAVE, save_only_model=True, logging_steps=1, report_to="tensorboard",
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=str(root / "init"), reward_funcs=digit_share, args=config, train_dataset=dataset, processing_class=tok
    )
    callback = GeometryCallback(every=SAVE, k=K, trainer=trainer)
    # A bound no subspace keeps past the reference, so the alert path runs too (values are unaffected).
    callback.settings = dataclasses.replace(callback.settings, sim_below=0.999)
    trainer.add_callback(callback)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("opdgeom").addHandler(handler)
    try:
        trainer.train()
    finally:
        logging.getLogger("opdgeom").removeHandler(handler)
    return root, trainer, callback, warnings


def test_logged_geometry_equals_the_exact_engine_on_the_saved_checkpoints(grpo_run):
    root, trainer, callback, warnings = grpo_run
    out = root / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert callback.monitor.reference_step == 2  # the checkpoint nearest 20% of 6 steps
    logged = {e["step"]: e for e in trainer.state.log_history if "geometry/stable_rank" in e}
    assert sorted(logged) == [2, 4, 6]
    assert all(set(e) >= {f"geometry/{m}" for m in METRICS} | {"geometry/alerts"} for e in logged.values())
    # The Trainer's own per-step records are still there, every step (the callback restores should_log).
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == list(range(1, STEPS + 1))
    got = {(r["step"], r["tensor"], r["metric"]): r["value"] for r in callback.rows}
    folders = {0: root / "init", **{s: out / f"checkpoint-{s}" for s in (2, 4, 6)}}
    worst = {"stable_rank": 0.0, "sim": 0.0}
    for step in (2, 4, 6):
        assert logged[step]["geometry/relative_update_norm"] > 0  # the policy moved
        exact = trajectory_table({0: folders[0], 2: folders[2], **({step: folders[step]} if step > 2 else {})}, K=K)
        exact = exact.filter(pl.col("kind") == "matrix")
        ranks = exact.filter((pl.col("step") == step) & (pl.col("metric") == "stable_rank"))
        assert len(ranks) == 7  # one layer: q, k, v, o, gate, up, down
        assert set(ranks["tensor"]) == {m.name for m in callback.monitor.matrices}
        for name, value, _ in ranks.select("tensor", "value", "parameters").iter_rows():
            assert got[(step, name, "stable_rank")] == pytest.approx(value, rel=SR_RTOL), (step, name)
            worst["stable_rank"] = max(worst["stable_rank"], abs(got[(step, name, "stable_rank")] / value - 1))
        mean = sum(v * p for _, v, p in ranks.select("tensor", "value", "parameters").iter_rows())
        mean /= ranks["parameters"].sum()
        assert logged[step]["geometry/stable_rank"] == pytest.approx(mean, rel=SR_RTOL)
        assert got[(step, SUMMARY, "stable_rank")] == logged[step]["geometry/stable_rank"]
        if step == 2:
            continue
        sims = exact.filter((pl.col("step") == 2) & (pl.col("metric") == "subspace_similarity_to_final"))
        for name, value in sims.select("tensor", "value").iter_rows():
            assert got[(step, name, "subspace_similarity_to_reference")] == pytest.approx(value, abs=SIM_ATOL), name
            worst["sim"] = max(worst["sim"], abs(got[(step, name, "subspace_similarity_to_reference")] - value))
        mean = sum(v * p for v, p in sims.select("value", "parameters").iter_rows()) / sims["parameters"].sum()
        assert logged[step]["geometry/subspace_similarity_to_reference"] == pytest.approx(mean, abs=SIM_ATOL)
    assert logged[2]["geometry/subspace_similarity_to_reference"] == pytest.approx(1.0)
    # Alerts: none up to the reference, then one warning line per crossed bound, counted in the log.
    counts = [sum(f"at step {s}:" in line for line in warnings) for s in (2, 4, 6)]
    assert counts[0] == 0 and counts[1] >= 1 and all("channel alert" in line for line in warnings)
    assert [logged[s]["geometry/alerts"] for s in (2, 4, 6)] == counts
    assert callback.last_report.step == 6 and callback.last_report.alerts == warnings[-counts[2] :]
    # A report_to integration (TensorBoard, read back with its own reader) got the same values.
    (events_file,) = out.glob("**/events.out.tfevents*")
    events = EventAccumulator(str(events_file.parent))
    events.Reload()
    for metric in (*METRICS, "alerts"):
        series = events.Scalars(f"train/geometry/{metric}")
        assert [e.step for e in series] == [2, 4, 6]
        expected = [logged[s][f"geometry/{metric}"] for s in (2, 4, 6)]
        assert [e.value for e in series] == pytest.approx(expected, rel=1e-6, nan_ok=True), metric
    print(f"max |rel diff| stable rank {worst['stable_rank']:.2e}, max |diff| Sim_K {worst['sim']:.2e}")


def test_the_reference_comes_from_the_steps_the_trainer_saves():
    from types import SimpleNamespace

    from opdgeom.diagnose.callback import saved_steps

    state = SimpleNamespace(save_steps=4, max_steps=10)
    assert saved_steps(SimpleNamespace(save_strategy="steps"), state, every=3) == [4, 8, 10]  # and the final save
    assert saved_steps(SimpleNamespace(save_strategy="no"), state, every=3) == [3, 6, 9, 10]  # the observed steps
