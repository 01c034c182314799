"""The live channel monitor (issue 26) against the exact float64 engine on the same bf16 checkpoints,
its reference subspace restored on resume, and its alert on a constructed objective switch."""

import math

import polars as pl
import pytest
import torch

from opdgeom.geometry.compare import compare_checkpoints
from opdgeom.geometry.live import SUMMARY, ChannelMonitor, MonitorSettings, reference_step
from opdgeom.geometry.trajectory import trajectory_table
from opdgeom.models import build_model, load_model, save_model
from opdgeom.tokenizer import build_char_tokenizer

SPEC = {
    "source": "build", "architecture": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip
STEPS, EVERY = 10, 2
K = 8
# Tolerances of the iterative top-K (8 iterations, block 2K) against float64 SVD on these updates (a
# decaying spectrum over the flat floor that bf16 rounding of W_t adds): measured max errors 1e-15
# relative on the stable rank and 4.4e-5 on Sim_K (2e-3 with 4 iterations, 4e-9 with 20).
SR_RTOL, SIM_ATOL = 1e-9, 5e-4


def update_directions(model, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer matrix, a fixed update direction with a decaying spectrum (sigma_i = i^-1.5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and "layers" in name:
            m, n = p.shape
            r = min(m, n)
            u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
            out[name] = (u * torch.arange(1, r + 1, dtype=torch.float64) ** -1.5, v)
    return out


def trajectory(tmp_path, switch_at: int | None = None):
    """Checkpoints of a synthetic run: W_t = W_0 + (t/T) 0.05 ||W_0|| U S V^T, the direction replaced
    joined from ``switch_at`` on by an unrelated one growing 3x as fast (an objective switching halfway)."""
    tok = build_char_tokenizer()
    model = build_model(SPEC, tok, seed=0)
    save_model(model, tok, tmp_path / "step_000000")
    model = load_model(tmp_path / "step_000000")  # W_0 as the bf16 init folder holds it
    w0 = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    first, second = update_directions(model, 1), update_directions(model, 2)
    folders = {0: tmp_path / "step_000000"}
    for step in range(EVERY, STEPS + 1, EVERY):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in first:
                    before = min(step, switch_at or step)
                    us, v = first[name]
                    dw = before / STEPS * us @ v.T
                    if switch_at is not None and step > switch_at:
                        us2, v2 = second[name]
                        dw = dw + 3 * (step - switch_at) / STEPS * us2 @ v2.T
                    p.copy_(w0[name] + 0.05 * w0[name].norm() * dw / (first[name][0].norm()))
        folders[step] = tmp_path / f"step_{step:06d}"
        save_model(model, tok, folders[step])
    return folders


def observe_all(folders, settings: MonitorSettings):
    model = load_model(folders[0])
    monitor = ChannelMonitor(model, settings, STEPS, sorted(s for s in folders if s))
    reports = {}
    for step in sorted(folders)[1:]:
        model.load_state_dict(load_model(folders[step]).state_dict())
        reports[step] = monitor.observe(model, step)
    return monitor, reports


def values(report) -> dict[tuple[str, str], float]:
    return {(r["tensor"], r["metric"]): r["value"] for r in report.rows}


def test_live_metrics_equal_the_exact_engine_on_the_same_checkpoints(tmp_path):
    folders = trajectory(tmp_path)
    settings = MonitorSettings(every=EVERY, k=K)
    monitor, reports = observe_all(folders, settings)
    ref = monitor.reference_step
    assert ref == reference_step([2, 4, 6, 8, 10], STEPS, 0.2) == 2
    for step in (4, 10):
        got = values(reports[step])
        pair = compare_checkpoints(folders[0], folders[step], k=K).filter(pl.col("kind") == "matrix")
        exact = trajectory_table({0: folders[0], ref: folders[ref], step: folders[step]}, K=K)
        exact = exact.filter((pl.col("kind") == "matrix") & (pl.col("step") == ref))  # Sim_K(ref, T=step)
        for row in pair.iter_rows(named=True):
            name, metric = row["tensor"], row["metric"]
            if ":" in name:  # the compare table's aggregate rows
                continue
            if metric == "relative_update_norm":
                assert got[(name, metric)] == pytest.approx(row["value"], rel=1e-7), name  # compare sums in fp32
            if metric == "bf16_sparsity":
                assert got[(name, "bf16_visible_fraction")] == pytest.approx(1 - row["value"], abs=1e-12), name
        sims = dict(
            exact.filter(pl.col("metric") == "subspace_similarity_to_final").select("tensor", "value").iter_rows()
        )
        assert sims and all(
            got[(n, "subspace_similarity_to_reference")] == pytest.approx(v, abs=SIM_ATOL) for n, v in sims.items()
        )
        later = trajectory_table({0: folders[0], step: folders[step]}, K=K).filter(pl.col("metric") == "stable_rank")
        for name, value in later.filter(pl.col("kind") == "matrix").select("tensor", "value").iter_rows():
            assert got[(name, "stable_rank")] == pytest.approx(value, rel=SR_RTOL), name
    summary = reports[10].summary
    rows = [r for r in reports[10].rows if r["metric"] == "stable_rank" and r["tensor"] != SUMMARY]
    weighted = sum(r["value"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows)
    assert summary["stable_rank"] == pytest.approx(weighted, rel=1e-12)
    assert all(
        math.isnan(values(reports[2])[(m.name, "subspace_similarity_to_reference")]) is False for m in monitor.matrices
    )


def test_a_resumed_monitor_restores_the_reference_from_its_checkpoint(tmp_path):
    folders = trajectory(tmp_path)
    settings = MonitorSettings(every=EVERY, k=K)
    _, reports = observe_all(folders, settings)
    resumed = ChannelMonitor(load_model(folders[0]), settings, STEPS, sorted(s for s in folders if s))
    resumed.restore_reference(folders[resumed.reference_step])
    model = load_model(folders[8])
    again = values(resumed.observe(model, 8))
    for key, value in values(reports[8]).items():  # warm-started from another basis: within the method's error
        assert again[key] == pytest.approx(value, abs=SIM_ATOL, rel=SR_RTOL, nan_ok=True), key


def test_the_channel_alert_fires_on_an_objective_switch_and_not_on_a_steady_run(tmp_path):
    settings = MonitorSettings(every=EVERY, k=K)
    _, steady = observe_all(trajectory(tmp_path / "steady"), settings)
    assert not any(r.alerts for r in steady.values())
    _, switched = observe_all(trajectory(tmp_path / "switched", switch_at=6), settings)
    assert not any(switched[s].alerts for s in (2, 4, 6))
    alerts = switched[10].alerts
    assert alerts and "Sim_K to step 2 below 0.5" in alerts[0] and "model.layers." in alerts[0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="monitor: every"):
        MonitorSettings(every=0)
