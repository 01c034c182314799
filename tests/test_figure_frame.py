"""The geometry figures' shared opening (figures/frame.py): what it checks, reads and keeps."""

from __future__ import annotations

import polars as pl
import pytest

from opdgeom.figures.frame import Frame
from opdgeom.figures.style import run_styles
from opdgeom.geometry.compare import SCHEMA

METHODS = {"sft": "sft", "opd": "opd", "opd.topkl50": "opd"}


def _table(path, run, rows):
    frame = pl.DataFrame(rows, schema=SCHEMA, orient="row").with_columns(run=pl.lit(run))
    frame.write_parquet(path)
    return path


def _rows(value):
    """A layer matrix, an embedding, a norm vector and an aggregate, all of one metric."""
    return [
        ("model.layers.0.self_attn.q_proj.weight", "matrix", 0, "q_proj", "spectral_shift", 16, value),
        ("model.embed_tokens.weight", "embedding", None, "embed_tokens", "spectral_shift", 64, 9.0),
        ("model.layers.0.input_layernorm.weight", "vector", 0, "input_layernorm", "spectral_shift", 4, 9.0),
        ("all:matrix", "matrix", None, None, "spectral_shift", 1000, 9.0),
    ]


@pytest.fixture
def tables(tmp_path):
    return [_table(tmp_path / f"{run}.parquet", run, _rows(float(i))) for i, run in enumerate(METHODS)]


def test_open_defaults_to_every_run_in_config_order_and_keeps_only_layer_matrices(tables):
    frame = Frame.open("fig", list(reversed(tables)), METHODS)
    assert frame.runs == list(METHODS)
    rows = frame.matrices("spectral_shift")
    assert rows.sort("run")["tensor"].to_list() == ["model.layers.0.self_attn.q_proj.weight"] * 3
    assert dict(zip(rows["run"], rows["value"])) == {"sft": 0.0, "opd": 1.0, "opd.topkl50": 2.0}
    assert frame.rows("spectral_shift", tensor="all:matrix").height == 3


def test_drawn_runs_limit_rows_and_styles(tables):
    frame = Frame.open("fig", tables, METHODS, runs=["opd.topkl50", "sft"])
    assert set(frame.matrices("spectral_shift")["run"]) == {"opd.topkl50", "sft"}
    assert frame.styles() == run_styles(METHODS, ["opd.topkl50", "sft"])
    tagged = frame.with_method(pl.DataFrame({"run": ["sft", "opd.topkl50"]}), metric="m")
    assert tagged.to_dicts() == [
        {"run": "sft", "method": "sft", "metric": "m"},
        {"run": "opd.topkl50", "method": "opd", "metric": "m"},
    ]


def test_bad_options_and_tables_are_named(tables, tmp_path):
    with pytest.raises(ValueError, match="fig: option 'methods'"):
        Frame.open("fig", tables, {})
    with pytest.raises(ValueError, match=r"fig: run\(s\) \['rlvr'\] in option 'runs'"):
        Frame.open("fig", tables, METHODS, runs=["rlvr"])
    with pytest.raises(ValueError, match=r"\['opd.topkl50'\] not found .*sft.parquet"):
        Frame.open("fig", tables[:2], METHODS)
    with pytest.raises(ValueError, match="lacks column"):
        Frame.open("fig", tables, METHODS, columns=("run", "step"))
    frame = Frame.open("fig", tables, METHODS)
    with pytest.raises(ValueError, match="'stable_rank' missing from every input table"):
        frame.matrices("stable_rank")
    only_aggregate = [_table(tmp_path / f"agg_{r}.parquet", r, _rows(0.0)[3:]) for r in METHODS]
    with pytest.raises(ValueError, match="fig: metric 'spectral_shift' has no per-layer matrix rows"):
        Frame.open("fig", only_aggregate, METHODS).matrices("spectral_shift")
