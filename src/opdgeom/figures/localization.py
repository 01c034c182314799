"""Localization: where the bf16-visible update lands, per run, against the random baseline alpha."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from opdgeom.figures.frame import Frame
from opdgeom.figures.style import legend_below, new_grid, save
from opdgeom.figures.tables import run_order, summarise, write_csv

NAME = "localization"
PANELS = [
    ("update_density", "update density\n(1 − bf16 sparsity, all matrices)"),
    ("mask_overlap_principal", "overlap with principal mask\n(|M_princ ∧ M| / |M|)"),
    ("mask_overlap_low_magnitude", "overlap with low-magnitude mask\n(|M_low ∧ M| / |M|)"),
]


def localization_figure(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    alpha: float | None = None,
    runs: list[str] | None = None,
    dpi: int = 200,
) -> pl.DataFrame:
    """Three panels of horizontal bars, one bar per run (config order, top to bottom).

    update_density = 1 - bf16_sparsity of the "all:matrix" aggregate (exact, parameter-weighted);
    mask overlaps = parameter-weighted mean over layer matrices of mask_overlap_{principal,low_magnitude}.
    ``alpha`` (required): mask fraction used by the diagnostics, the overlaps' random baseline (dashed).
    CSV: run, method, metric, value, baseline, n_matrices.
    """
    if alpha is None:
        raise ValueError(f"{NAME}: option 'alpha' (mask fraction = random-overlap baseline) is required")
    alpha = float(alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"{NAME}: option 'alpha' must lie in (0, 1), not {alpha}")
    frame = Frame.open(NAME, inputs, methods, runs)
    runs = frame.runs
    sparsity = frame.rows("bf16_sparsity", tensor="all:matrix")
    density = sparsity.select(
        "run",
        value=1 - pl.col("value"),
        metric=pl.lit("update_density"),
        baseline=pl.lit(None, pl.Float64),
        n_matrices=pl.lit(None, pl.UInt32),
    )
    parts = [density]
    for metric, _ in PANELS[1:]:
        means = summarise(frame.matrices(metric), ["run"], "weighted_mean")
        parts.append(
            means.select("run", "value", metric=pl.lit(metric), baseline=pl.lit(alpha), n_matrices="n_matrices")
        )
    order = {m: i for i, (m, _) in enumerate(PANELS)}
    data = (
        frame.with_method(pl.concat(parts, how="vertical_relaxed"))
        .sort(pl.col("metric").replace_strict(order), run_order(runs))
        .select("run", "method", "metric", "value", "baseline", "n_matrices")
    )
    write_csv(data, out_prefix)

    styles = frame.styles()
    height = 1.4 + 0.16 * len(runs)
    fig, axes = new_grid(1, 3, height_in=height, sharey=True)
    y = np.arange(len(runs))
    for ax, (metric, label) in zip(axes[0], PANELS):
        rows = data.filter(pl.col("metric") == metric).sort(run_order(runs))
        values = rows["value"].to_numpy()
        colors = [styles[r].color for r in rows["run"]]
        ax.barh(y, values, color=colors, height=0.7)
        if metric == "update_density":
            for yi, v in zip(y, values):
                ax.annotate(f"{v:.3g}", (v, yi), xytext=(2, 0), textcoords="offset points", va="center", fontsize=5.5)
        else:
            baseline = ax.axvline(alpha, color="0.2", ls="--", lw=0.9)
        ax.set_xlim(
            0,
            max(1.0, float(np.nanmax(values)) * 1.05)
            if metric == "update_density"
            else max(alpha, float(np.nanmax(values))) * 1.15,
        )
        ax.set_xlabel(label)
        ax.grid(True, axis="x", lw=0.3, alpha=0.5)
    axes[0][0].set_yticks(y, runs)
    axes[0][0].invert_yaxis()
    for tick, run in zip(axes[0][0].get_yticklabels(), runs):
        tick.set_color(styles[run].color)
    legend_below(fig, [baseline], [f"random baseline (mask fraction α = {alpha:g})"])
    fig.suptitle(
        "Where each run's update lands: density of the bf16-visible update mask M, and its overlap with\n"
        "the principal and low-magnitude masks of W0 (overlaps: parameter-weighted mean over matrices)",
        fontsize=8,
    )
    save(fig, out_prefix, dpi=dpi)
    return data
