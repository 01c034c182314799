"""The opening every geometry figure shares: check its options, read its tables, take a metric's
per-layer matrix rows, tag rows with their method, style each run.

A figure function starts with ``frame = Frame.open(NAME, inputs, methods, runs)`` and from then on
works on ``frame.runs``, ``frame.matrices(metric)`` and ``frame.styles()``; every check raises
ValueError naming the figure and the file, run or metric at fault (see figures/tables.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from opdgeom.figures.style import RunStyle, run_styles
from opdgeom.figures.tables import (
    GEOMETRY_COLUMNS,
    check_methods,
    layer_matrices,
    metric_rows,
    read_tables,
    require_runs,
    select_runs,
)


@dataclass(frozen=True)
class Frame:
    figure: str
    methods: dict[str, str]  # run -> method, config order
    runs: list[str]  # the runs this figure draws, in the order it draws them
    table: pl.DataFrame

    @classmethod
    def open(
        cls,
        figure: str,
        inputs: list[Path],
        methods: dict[str, str] | None,
        runs: list[str] | None = None,
        columns: tuple[str, ...] = GEOMETRY_COLUMNS,
    ) -> Frame:
        """Check ``methods`` and ``runs`` (default: every run of ``methods``), read ``inputs`` (each
        must have ``columns``) and require a row of every drawn run."""
        methods = check_methods(figure, methods)
        runs = select_runs(figure, methods, runs)
        table = read_tables(figure, inputs, columns)
        require_runs(figure, table, runs)
        return cls(figure, methods, runs, table)

    def rows(self, metric: str, **equal) -> pl.DataFrame:
        """Rows of ``metric`` (and column == value for each ``equal``) for the drawn runs; every run
        must have some."""
        return metric_rows(self.figure, self.table, metric, self.runs, **equal)

    def matrices(self, metric: str) -> pl.DataFrame:
        """The per-layer 2-D matrix rows of ``metric`` (no aggregates, embeddings, lm_head or vectors)
        for the drawn runs; a metric with aggregate rows only is an error."""
        rows = layer_matrices(self.rows(metric))
        if rows.is_empty():
            raise ValueError(f"{self.figure}: metric {metric!r} has no per-layer matrix rows in the input tables")
        return rows

    def with_method(self, data: pl.DataFrame, **columns) -> pl.DataFrame:
        """``data`` with a ``method`` column from its ``run`` (and any constant ``columns``)."""
        return data.with_columns(
            method=pl.col("run").replace_strict(self.methods), **{k: pl.lit(v) for k, v in columns.items()}
        )

    def styles(self) -> dict[str, RunStyle]:
        return run_styles(self.methods, self.runs)
