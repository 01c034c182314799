"""Rotation: principal angles between the top-k singular subspaces of W0 and W+, per layer and run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from matplotlib.ticker import MaxNLocator

from opdgeom.figures.frame import Frame
from opdgeom.figures.style import legend_below, new_grid, save
from opdgeom.figures.tables import run_order, summarise, write_csv

NAME = "rotation"


def rotation_figure(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    runs: list[str] | None = None,
    statistic: str = "max",
    summary: str = "median",
    k: int = 16,
    log_y: bool = True,
    dpi: int = 200,
) -> pl.DataFrame:
    """Two panels (left / right singular subspaces): x = layer, one line per run.

    ``statistic``: "max" or "mean" principal angle of each matrix (metrics
    principal_angle_{left,right}_{max,mean}); ``summary``: how a layer's matrices are combined
    ("median", "mean", "max"); ``k``: the subspace size the tables were computed with (labels only).
    CSV: run, method, side, layer, metric, summary, value, q25, q75, n_matrices, n_nan.
    """
    if statistic not in ("max", "mean"):
        raise ValueError(f"{NAME}: option 'statistic' must be 'max' or 'mean', not {statistic!r}")
    frame = Frame.open(NAME, inputs, methods, runs)
    runs = frame.runs
    parts = []
    for side in ("left", "right"):
        metric = f"principal_angle_{side}_{statistic}"
        per_layer = summarise(frame.matrices(metric), ["run", "layer"], summary)
        parts.append(per_layer.with_columns(side=pl.lit(side), metric=pl.lit(metric), summary=pl.lit(summary)))
    data = (
        frame.with_method(pl.concat(parts, how="vertical_relaxed"))
        .sort(run_order(runs), "side", "layer")
        .select("run", "method", "side", "layer", "metric", "summary", "value", "q25", "q75", "n_matrices", "n_nan")
    )
    write_csv(data, out_prefix)

    styles = frame.styles()
    fig, axes = new_grid(1, 2, height_in=2.6, sharey=True)
    positive = data.filter(pl.col("value") > 0)
    for ax, side in zip(axes[0], ("left", "right")):
        for run in runs:
            rows = data.filter(pl.col("run") == run, pl.col("side") == side)
            ax.plot(rows["layer"], rows["value"], label=run, **styles[run].line())
        if log_y and not positive.is_empty():
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_title(f"{side} singular vectors (U)" if side == "left" else f"{side} singular vectors (V)")
        ax.grid(True, which="major", lw=0.3, alpha=0.5)
    axes[0][0].set_ylabel(f"{statistic} principal angle, top-{k} (degrees)")
    fig.suptitle(
        f"Rotation of the top-{k} singular subspaces, final vs. initial weights ({summary} over each layer's matrices)",
        fontsize=8,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_below(fig, handles, labels)
    save(fig, out_prefix, dpi=dpi)
    return data
