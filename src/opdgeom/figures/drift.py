"""Drift: normalized spectral shift (NSS) of every run, per module type (log scale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from opdgeom.figures.frame import Frame
from opdgeom.figures.style import legend_below, new_grid, save
from opdgeom.figures.tables import module_order, run_order, summarise, write_csv

NAME = "drift"
METRIC = "spectral_shift"
ALL = "all matrices"


def drift_figure(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    runs: list[str] | None = None,
    summary: str = "median",
    dpi: int = 200,
) -> pl.DataFrame:
    """x = module type (plus "all matrices"), one point per run dodged within each group, log y.

    Each point is the ``summary`` ("median" default, "mean" or "max") of the NSS of that module's
    matrices over all layers; with the median, whiskers span the interquartile range.
    CSV: run, method, module, metric, summary, value, q25, q75, n_matrices, n_nan.
    """
    frame = Frame.open(NAME, inputs, methods, runs)
    runs = frame.runs
    rows = frame.matrices(METRIC)
    modules = module_order(rows["module"].unique().to_list())
    per_module = summarise(rows, ["run", "module"], summary)
    overall = summarise(rows.with_columns(module=pl.lit(ALL)), ["run", "module"], summary)
    groups = [*modules, ALL]
    data = (
        frame.with_method(pl.concat([per_module, overall], how="vertical_relaxed"), metric=METRIC, summary=summary)
        .sort(run_order(runs), pl.col("module").replace_strict({m: i for i, m in enumerate(groups)}))
        .select("run", "method", "module", "metric", "summary", "value", "q25", "q75", "n_matrices", "n_nan")
    )
    write_csv(data, out_prefix)

    styles = frame.styles()
    fig, axes = new_grid(1, 1, height_in=2.8)
    ax = axes[0][0]
    width = 0.8
    offsets = (np.arange(len(runs)) - (len(runs) - 1) / 2) * (width / max(len(runs), 1))
    for offset, run in zip(offsets, runs):
        rows_run = data.filter(pl.col("run") == run)
        x = [groups.index(m) + offset for m in rows_run["module"]]
        y = rows_run["value"].to_numpy()
        style = styles[run]
        if summary == "median":
            low = np.maximum(y - rows_run["q25"].to_numpy(), 0)
            high = np.maximum(rows_run["q75"].to_numpy() - y, 0)
            ax.errorbar(x, y, yerr=[low, high], fmt="none", ecolor=style.color, elinewidth=0.6, capsize=0)
        ax.plot(x, y, ls="none", marker=style.marker, ms=3.5, color=style.color, label=run, mfc=style.marker_face())
    for i in range(1, len(groups)):
        ax.axvline(i - 0.5, color="0.85", lw=0.5)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    if not data.filter(pl.col("value") > 0).is_empty():
        ax.set_yscale("log")
    ax.set_ylabel(r"NSS $\|\sigma(W_+)-\sigma(W_0)\|_2 / \|\sigma(W_0)\|_2$")
    ax.set_xlabel("module type")
    ax.set_title(f"Normalized spectral shift per module type, final vs. initial weights ({summary} over layers)")
    ax.grid(True, axis="y", which="major", lw=0.3, alpha=0.5)
    handles, labels = ax.get_legend_handles_labels()
    legend_below(fig, handles, labels)
    save(fig, out_prefix, dpi=dpi)
    return data
