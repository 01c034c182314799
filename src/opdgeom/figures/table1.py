"""Table 1: bf16-aware update sparsity per run (final checkpoint vs the run's init)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from opdgeom.io import write_text

COLUMNS = {"all:matrix": "matrices", "all:embedding": "embedding", "all:lm_head": "lm_head", "all:vector": "1-D"}


def table1(inputs: list[Path], out_prefix: Path, methods: dict[str, str]) -> pl.DataFrame:
    """Rows: runs in config order; columns: sparsity of each tensor kind (fraction unchanged)."""
    long = pl.concat([pl.read_parquet(p) for p in inputs])
    long = long.filter(pl.col("metric") == "bf16_sparsity", pl.col("tensor").is_in(list(COLUMNS)))
    wide = (
        long.with_columns(pl.col("tensor").replace(COLUMNS))
        .pivot(on="tensor", index=["run", "step"], values="value")
        .with_columns(method=pl.col("run").replace_strict(methods, default="?"))
    )
    order = {run: i for i, run in enumerate(methods)}
    wide = wide.sort(pl.col("run").replace_strict(order, default=len(order)))
    value_cols = [c for c in COLUMNS.values() if c in wide.columns]
    wide = wide.select("run", "method", "step", *value_cols)
    csv = wide.write_csv()
    write_text(csv, Path(f"{out_prefix}.csv"))
    write_text(_markdown(wide, value_cols), Path(f"{out_prefix}.md"))
    return wide


def _markdown(wide: pl.DataFrame, value_cols: list[str]) -> str:
    header = ["run", "method", "step", *[f"sparsity ({c})" for c in value_cols]]
    lines = [
        "Table 1. bf16-aware update sparsity (fraction of weights unchanged, eta = 1e-3) of each run's "
        "final checkpoint against its initialisation.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(value_cols)) + "|",
    ]
    for row in wide.iter_rows(named=True):
        cells = [row["run"], row["method"], str(row["step"]), *[f"{row[c]:.4f}" for c in value_cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
