"""Heatmaps (beyond the paper): where in the network each run writes, layer x module type."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.colors import LogNorm, Normalize
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from opdgeom.figures.frame import Frame
from opdgeom.figures.style import new_grid, save
from opdgeom.figures.tables import module_order, run_order, weighted_mean, write_csv

NAME = "heatmap"
SHORT = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
# metric shown -> (source metric, transform, colour-bar label, colour map)
PANELS = {
    "update_density": ("bf16_sparsity", lambda v: 1 - v, "update density\n(1 − sparsity)", "viridis"),
    "spectral_shift": ("spectral_shift", lambda v: v, "normalized\nspectral shift", "magma"),
}
NO_VALUE = "0.85"  # cells with no tensor, or a zero on a log scale


def heatmap_figure(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    runs: list[str] | None = None,
    metrics: list[str] | None = None,
    columns: int = 6,
    log_density: bool = True,
    dpi: int = 200,
) -> pl.DataFrame:
    """For each metric ("update_density", "spectral_shift" by default) a block of panels, one per run
    (``columns`` per row), each a layer (y, 0 at the bottom) x module type (x) heatmap. All runs of a
    metric share one colour scale and one colour bar: logarithmic for NSS, and for density too unless
    ``log_density`` is false (then linear 0-1); grey cells have no tensor or a zero on a log scale.
    A cell holding several tensors shows their parameter-weighted mean.
    CSV: run, method, metric, layer, module, value.
    """
    metrics = list(metrics or PANELS)
    unknown = [m for m in metrics if m not in PANELS]
    if unknown:
        raise ValueError(f"{NAME}: unknown metric(s) {unknown} in option 'metrics'; choose from {list(PANELS)}")
    frame = Frame.open(NAME, inputs, methods, runs)
    runs = frame.runs
    parts = []
    for shown in metrics:
        source, transform, *_ = PANELS[shown]
        cells = (
            frame.matrices(source)
            .with_columns(value=transform(pl.col("value")).fill_nan(None))
            .group_by("run", "layer", "module")
            .agg(value=weighted_mean())
        )
        parts.append(cells.with_columns(metric=pl.lit(shown)))
    data = pl.concat(parts, how="vertical_relaxed")
    modules = module_order(data["module"].unique().to_list())
    data = (
        frame.with_method(data)
        .sort(
            pl.col("metric").replace_strict({m: i for i, m in enumerate(metrics)}),
            run_order(runs),
            "layer",
            pl.col("module").replace_strict({m: i for i, m in enumerate(modules)}),
        )
        .select("run", "method", "metric", "layer", "module", "value")
    )
    write_csv(data, out_prefix)

    layers = sorted(data["layer"].unique().to_list())
    ncols = max(1, min(columns, len(runs)))
    rows_per_metric = math.ceil(len(runs) / ncols)
    # A panel (and so each colour bar) is at least 1.2 in tall: two-layer tiny models keep readable
    # colour-bar ticks and labels.
    panel_h = max(1.2, 0.5 + 0.045 * len(layers))
    nrows = rows_per_metric * len(metrics)
    fig, axes = new_grid(nrows, ncols, height_in=0.5 + panel_h * nrows)
    styles = frame.styles()
    labels = [SHORT.get(m, m) for m in modules]
    for b, shown in enumerate(metrics):
        _, _, bar_label, cmap = PANELS[shown]
        log = shown == "spectral_shift" or log_density
        cmap = matplotlib.colormaps[cmap].with_extremes(bad=NO_VALUE)
        block = data.filter(pl.col("metric") == shown)
        values = block["value"].drop_nulls().to_numpy()
        if log:
            positive = values[values > 0]
            lo, hi = (positive.min(), positive.max()) if positive.size else (1e-8, 1.0)
            if shown == "update_density":
                hi = 1.0
            norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
        else:
            norm = Normalize(vmin=0.0, vmax=1.0)
        block_axes = axes[b * rows_per_metric : (b + 1) * rows_per_metric]
        image = None
        for i, ax in enumerate(block_axes.flat):
            if i >= len(runs):
                ax.set_axis_off()
                continue
            run = runs[i]
            grid = np.full((len(layers), len(modules)), np.nan)
            for row in block.filter(pl.col("run") == run).iter_rows(named=True):
                if row["value"] is not None:
                    grid[layers.index(row["layer"]), modules.index(row["module"])] = row["value"]
            if log:
                grid = np.where(grid > 0, grid, np.nan)
            image = ax.imshow(
                grid,
                aspect="auto",
                origin="lower",
                cmap=cmap,
                norm=norm,
                interpolation="nearest",
                extent=(-0.5, len(modules) - 0.5, layers[0] - 0.5, layers[-1] + 0.5),
            )
            ax.set_title(run, color=styles[run].color, fontsize=7)
            ax.set_xticks(range(len(modules)), labels, rotation=90, fontsize=6)
            ax.set_yticks(layers)  # one tick per layer, integers only
            ax.tick_params(axis="y", labelsize=6)
            if i % ncols == 0:
                ax.set_ylabel("layer")
            else:
                ax.set_yticklabels([])
        if image is not None:
            label = f"{bar_label}{' (log)' if log else ''}"
            bar = fig.colorbar(image, ax=block_axes.ravel().tolist(), shrink=0.95, pad=0.01, aspect=12)
            bar.set_label(label, fontsize=6)
            bar.ax.tick_params(labelsize=6)
            if log:  # few labelled ticks, plain numbers, no minor labels: nothing overlaps on a short bar
                decades = math.log10(norm.vmax / norm.vmin)
                subs = (1.0, 2.0, 5.0) if decades < 1.5 else (1.0,)
                bar.ax.yaxis.set_major_locator(LogLocator(subs=subs, numticks=5 if decades >= 1.5 else 12))
                bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                bar.ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(
        "Where each run writes: per-layer, per-module update density and spectral shift (final vs. initial weights)",
        fontsize=8,
    )
    save(fig, out_prefix, dpi=dpi)
    return data
