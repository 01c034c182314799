"""Table 1: bf16-aware update sparsity per run (final checkpoint vs the run's init)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from opdgeom.figures.tables import groups_of
from opdgeom.io import write_text
from opdgeom.stats import seed_interval

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
    """One row per run entry: seed replicates ("opd.s0", "opd.s1", ...) pooled into their mean with a
    95% Student-t interval over seeds; an entry with one seed has no interval."""
    header = ["run", "method", "seeds", "step", *[f"sparsity ({c})" for c in value_cols]]
    lines = [
        "Table 1. bf16-aware update sparsity (fraction of weights unchanged, eta = 1e-3) of each run's "
        "final checkpoint against its initialisation; mean over seeds [95% t interval over seeds].",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 4 + ["---:"] * len(value_cols)) + "|",
    ]
    for group, runs in groups_of(wide["run"].to_list()).items():
        rows = wide.filter(pl.col("run").is_in(runs))
        cells = [group, rows["method"][0], str(len(runs)), str(rows["step"][0])]
        cells += [seed_interval(rows[c].to_list()).format(4) for c in value_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
