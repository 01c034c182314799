"""Checkpoint comparison tables: schema, per-tensor rows and exact aggregates."""

import polars as pl
import torch
from test_geometry_stream import tiny_state, write_model

from opdgeom.geometry.compare import SCHEMA, sparsity_table
from opdgeom.geometry.metrics import unchanged_count


def updated_state(state: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """Change a different random fraction of every tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, w) in enumerate(sorted(state.items())):
        changed = torch.rand(w.shape, generator=gen) < (i + 1) / (len(state) + 2)
        out[name] = torch.where(changed, w.float() * 1.05 + 0.01, w.float()).to(w.dtype)
    return out


def test_sparsity_table(tmp_path):
    state_a = tiny_state(0)
    state_b = updated_state(state_a)
    dir_a = write_model(tmp_path / "a", state_a)
    dir_b = write_model(tmp_path / "b", state_b, shards=2)
    table = sparsity_table(dir_a, dir_b)
    assert table.schema == pl.Schema(SCHEMA)
    assert set(table["metric"]) == {"bf16_sparsity"}

    per_tensor = table.filter(~pl.col("tensor").str.contains(":"))
    assert sorted(per_tensor["tensor"]) == sorted(state_a)
    for row in per_tensor.iter_rows(named=True):
        expected = unchanged_count(state_a[row["tensor"]], state_b[row["tensor"]]) / state_a[row["tensor"]].numel()
        assert row["value"] == expected and row["parameters"] == state_a[row["tensor"]].numel()

    aggregates = {row["tensor"]: row for row in table.filter(pl.col("tensor").str.contains(":")).iter_rows(named=True)}
    assert set(aggregates) == {
        "module:q_proj",
        "module:gate_proj",
        "all:matrix",
        "all:embedding",
        "all:lm_head",
        "all:vector",
    }
    for key, names in {
        "module:gate_proj": [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2)],
        "all:vector": [n for n, w in state_a.items() if w.dim() == 1],
    }.items():
        unchanged = sum(unchanged_count(state_a[n], state_b[n]) for n in names)
        total = sum(state_a[n].numel() for n in names)
        assert aggregates[key]["value"] == unchanged / total
        assert aggregates[key]["parameters"] == total
        assert aggregates[key]["layer"] is None
    assert aggregates["module:q_proj"]["module"] == "q_proj"
    assert aggregates["all:matrix"]["kind"] == "matrix"


def test_identical_checkpoints_are_fully_sparse(tmp_path):
    state = tiny_state(0)
    table = sparsity_table(write_model(tmp_path / "a", state), write_model(tmp_path / "b", state))
    assert table["value"].to_list() == [1.0] * table.height


# ---------------------------------------------------------------- full comparison and trajectories

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from opdgeom.geometry import (  # noqa: E402
    StatCache,
    bf16_sparsity,
    compare_checkpoints,
    mask_overlap,
    principal_angles,
    spectral_shift,
    tail_index,
    trajectory_table,
)
from opdgeom.geometry.trajectory import TRAJECTORY_SCHEMA  # noqa: E402

SPECTRAL_METRICS = {
    "spectral_shift",
    "principal_angle_left_max",
    "principal_angle_left_mean",
    "principal_angle_right_max",
    "principal_angle_right_mean",
    "mask_overlap_principal",
    "mask_overlap_low_magnitude",
}


def test_compare_checkpoints_matches_the_metric_functions(tmp_path):
    state_a = tiny_state(0)
    state_b = updated_state(state_a)
    dir_a = write_model(tmp_path / "a", state_a)
    dir_b = write_model(tmp_path / "b", state_b)
    table = compare_checkpoints(dir_a, dir_b, k=4, alpha=0.1)
    assert table.schema == pl.Schema(SCHEMA)
    name = "model.layers.1.mlp.gate_proj.weight"
    got = dict(table.filter(pl.col("tensor") == name).select("metric", "value").iter_rows())
    assert set(got) == SPECTRAL_METRICS | {"bf16_sparsity", "update_frobenius_norm", "relative_update_norm"}
    w0, w1 = state_a[name], state_b[name]
    assert got["spectral_shift"] == pytest.approx(spectral_shift(w0, w1), rel=1e-12)
    left = principal_angles(w0, w1, 4, side="left")
    right = principal_angles(w0, w1, 4, side="right")
    assert got["principal_angle_left_max"] == pytest.approx(float(left.max()), rel=1e-9)
    assert got["principal_angle_right_mean"] == pytest.approx(float(right.mean()), rel=1e-9)
    assert got["bf16_sparsity"] == bf16_sparsity(w0, w1)  # counted in the overlap pass for these
    assert 0.0 < got["bf16_sparsity"] < 1.0
    overlap = mask_overlap(w0, w1, 0.1, 4)
    assert got["mask_overlap_principal"] == overlap["principal"]
    assert got["mask_overlap_low_magnitude"] == overlap["low_magnitude"]
    delta = (w1.double() - w0.double()).norm().item()
    assert got["update_frobenius_norm"] == pytest.approx(delta, rel=3e-7)  # float32 math, see update_norms
    assert got["relative_update_norm"] == pytest.approx(delta / w0.double().norm().item(), rel=3e-7)
    embedding = table.filter(pl.col("kind") == "embedding")
    assert not set(embedding["metric"]) & SPECTRAL_METRICS  # only layer matrices by default
    assert table.filter(pl.col("tensor") == "all:matrix")["metric"].to_list() == ["bf16_sparsity"]


def test_compare_checkpoints_cache_hits_share_the_anchor(tmp_path):
    state_a = tiny_state(0)
    dir_a = write_model(tmp_path / "a", state_a)
    dir_b = write_model(tmp_path / "b", updated_state(state_a, seed=1))
    dir_c = write_model(tmp_path / "c", updated_state(state_a, seed=2))
    cache = StatCache(tmp_path / "cache")
    plain = compare_checkpoints(dir_a, dir_b, k=4)
    cold = compare_checkpoints(dir_a, dir_b, k=4, cache=cache)
    matrices = 4  # per matrix: spectra of a and b, and a's mask selections
    assert (cache.hits, cache.misses) == (0, 3 * matrices)
    warm = compare_checkpoints(dir_a, dir_b, k=4, cache=cache)
    assert cache.hits == 3 * matrices
    assert plain.equals(cold) and cold.equals(warm)
    second = StatCache(tmp_path / "cache")
    against_c = compare_checkpoints(dir_a, dir_c, k=4, cache=second)
    assert (second.hits, second.misses) == (2 * matrices, matrices)  # only c's spectra are new
    assert against_c.equals(compare_checkpoints(dir_a, dir_c, k=4))
    assert StatCache(tmp_path / "cache").info()["entries"] == 4 * matrices
    compare_checkpoints(dir_a, dir_c, k=4, cache=tmp_path / "cache")  # a path works too


def float_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.o_proj.weight": scale * torch.randn(40, 24, generator=gen, dtype=torch.float64),
        "model.layers.0.mlp.down_proj.weight": scale * torch.randn(24, 48, generator=gen, dtype=torch.float64),
        "model.layers.0.input_layernorm.weight": scale * torch.randn(24, generator=gen, dtype=torch.float64),
    }


def test_trajectory_table(tmp_path):
    base = float_state(0)
    delta = float_state(1, scale=1e-3)
    steps = {0: base, 10: {n: base[n] + 0.5 * delta[n] for n in base}, 20: {n: base[n] + delta[n] for n in base}}
    dirs = {step: write_model(tmp_path / f"s{step}", state) for step, state in steps.items()}
    table = trajectory_table(dirs, K=4)
    assert table.schema == pl.Schema(TRAJECTORY_SCHEMA)
    assert sorted(set(table["step"])) == [10, 20]
    vector = table.filter(pl.col("kind") == "vector")
    assert set(vector["metric"]) == {"frobenius_norm"}
    name = "model.layers.0.mlp.down_proj.weight"
    for step in (10, 20):
        got = dict(
            table.filter((pl.col("tensor") == name) & (pl.col("step") == step)).select("metric", "value").iter_rows()
        )
        dw = (steps[step][name] - base[name]).numpy()
        s = np.linalg.svd(dw, compute_uv=False)
        assert got["frobenius_norm"] == pytest.approx(np.linalg.norm(dw), rel=1e-12)
        assert got["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
        assert got["tail_index"] == pytest.approx(tail_index(s), rel=1e-6)
        assert got["subspace_similarity_to_final"] == pytest.approx(1.0, abs=1e-9)  # dW_10 = dW_20 / 2

    noisy = dict(steps)
    noisy[10] = {n: base[n] + float_state(7, scale=1e-3)[n] for n in base}
    dirs[10] = write_model(tmp_path / "noisy", noisy[10])
    cache = StatCache(tmp_path / "cache")
    table = trajectory_table(dirs, K=4, cache=cache)
    assert cache.misses == 4 and trajectory_table(dirs, K=4, cache=cache).equals(table) and cache.hits == 4
    got = table.filter(
        (pl.col("tensor") == name) & (pl.col("step") == 10) & (pl.col("metric") == "subspace_similarity_to_final")
    )
    _, _, vt10 = np.linalg.svd((noisy[10][name] - base[name]).numpy())
    _, _, vt20 = np.linalg.svd((steps[20][name] - base[name]).numpy())
    expected = np.linalg.norm(vt10[:4] @ vt20[:4].T) ** 2 / 4
    assert got["value"].item() == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < 0.9


def test_trajectory_needs_two_checkpoints(tmp_path):
    with pytest.raises(ValueError):
        trajectory_table({0: tmp_path}, K=4)
