"""Checkpoint comparison tables: schema, per-tensor rows and exact aggregates."""

import polars as pl
import torch

from opdgeom.geometry.compare import SCHEMA, sparsity_table
from opdgeom.geometry.metrics import unchanged_count
from test_geometry_stream import tiny_state, write_model


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
        "module:q_proj", "module:gate_proj", "all:matrix", "all:embedding", "all:lm_head", "all:vector",
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
