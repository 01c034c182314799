"""The update-budget sweep (beyond the paper): geometry of the final update against the budget.

x = lr x steps / rms(W0): the peak learning rate times the number of steps over the rms of the run's
initial layer matrices (measured: ||W0||_F / sqrt(n) from the compare table, median over matrices).
With AdamW a weight moves by about lr per step, so this is the largest cumulative move of a weight
relative to its own size. One panel per metric, one line per method; each point is the mean over
the seeds of one run entry with its t interval (error bar).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from opdgeom.figures.style import METHOD_LABELS, color_for, legend_below, new_grid, save
from opdgeom.figures.tables import GEOMETRY_COLUMNS, layer_matrices, over_seeds, read_tables, write_csv

NAME = "budget"
# metric -> (table, per-matrix source metric, summary over matrices, axis label, log y)
METRICS = {
    "bf16_sparsity": ("compare", "bf16_sparsity", "weighted", "bf16 update sparsity\n(fraction unchanged)", False),
    "principal_angle": (
        "compare",
        "principal_angle_right_max",
        "median",
        "max principal angle, top-k\nright subspace (deg, median)",
        True,
    ),
    "stable_rank": ("trajectory", "stable_rank", "median", "stable rank of ΔW\n(median over matrices)", False),
    "relative_update": ("compare", "relative_update_norm", "median", "‖ΔW‖_F / ‖W0‖_F\n(median over matrices)", True),
}


def weight_rms(compare: pl.DataFrame) -> pl.DataFrame:
    """Per run: median over layer matrices of rms(W0) = ||W0||_F / sqrt(n), where ||W0||_F is
    update_frobenius_norm / relative_update_norm (matrices whose update is zero have no value)."""
    rows = layer_matrices(compare.filter(pl.col("metric").is_in(["update_frobenius_norm", "relative_update_norm"])))
    wide = rows.pivot(on="metric", index=["run", "tensor", "parameters"], values="value")
    return (
        wide.filter(pl.col("relative_update_norm") > 0)
        .with_columns(
            rms=pl.col("update_frobenius_norm") / pl.col("relative_update_norm") / pl.col("parameters").sqrt()
        )
        .group_by("run")
        .agg(rms=pl.col("rms").median())
    )


def budget_figure(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    budgets: dict[str, float],
    metrics: list[str] | None = None,
    dpi: int = 200,
) -> pl.DataFrame:
    """``budgets``: run -> peak lr x steps (from the plan). Inputs: compare and trajectory tables.
    CSV: group, method, lr_steps, rms, budget, metric, mean, lo, hi, n_seeds."""
    metrics = list(metrics or ["bf16_sparsity", "principal_angle", "stable_rank"])
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"{NAME}: unknown metric(s) {unknown}; choose from {list(METRICS)}")
    compare_paths = [p for p in inputs if "/compare/" in str(p)]
    trajectory_paths = [p for p in inputs if "/trajectory/" in str(p)]
    compare = read_tables(NAME, compare_paths, GEOMETRY_COLUMNS)
    trajectory = read_tables(NAME, trajectory_paths, (*GEOMETRY_COLUMNS, "step")) if trajectory_paths else None
    rms = weight_rms(compare)
    lr_steps = len(set(budgets.values()))
    if lr_steps < 2:
        raise ValueError(f"{NAME}: a sweep needs runs at two or more budgets, got {sorted(set(budgets.values()))}")
    parts = []
    for shown in metrics:
        table_kind, source, how, *_ = METRICS[shown]
        if table_kind == "trajectory":
            if trajectory is None:
                raise ValueError(f"{NAME}: metric {shown!r} needs trajectory tables")
            last = trajectory.group_by("run").agg(pl.col("step").max().alias("last"))
            rows = layer_matrices(trajectory.join(last, on="run").filter(pl.col("step") == pl.col("last")))
        else:
            rows = layer_matrices(compare)
        rows = rows.filter(pl.col("metric") == source).with_columns(value=pl.col("value").fill_nan(None))
        if how == "weighted":
            agg = (pl.col("value") * pl.col("parameters")).sum() / pl.col("parameters").filter(
                pl.col("value").is_not_null()
            ).sum()
        else:
            agg = pl.col("value").median()
        per_run = rows.group_by("run").agg(value=agg).with_columns(metric=pl.lit(shown))
        parts.append(per_run)
    per_run = pl.concat(parts).filter(pl.col("run").is_in(list(budgets)))
    per_run = per_run.with_columns(
        lr_steps=pl.col("run").replace_strict(budgets, return_dtype=pl.Float64),
        method=pl.col("run").replace_strict(methods, default="?"),
    )
    data = over_seeds(per_run, ["metric", "method", "lr_steps"])
    group_rms = over_seeds(rms.with_columns(metric=pl.lit("rms")).rename({"rms": "value"}), ["metric"]).select(
        "group", pl.col("mean").alias("rms")
    )
    data = data.join(group_rms, on="group", how="left").with_columns(budget=pl.col("lr_steps") / pl.col("rms"))
    data = data.sort("metric", "method", "lr_steps").select(
        "group", "method", "lr_steps", "rms", "budget", "metric", "mean", "lo", "hi", "n_seeds"
    )
    write_csv(data, out_prefix)

    fig, axes = new_grid(1, len(metrics), height_in=2.8)
    order = list(dict.fromkeys(methods.values()))
    for ax, shown in zip(axes[0], metrics):
        *_, label, log_y = METRICS[shown]
        for i, method in enumerate(order):
            line = data.filter(pl.col("metric") == shown, pl.col("method") == method).sort("budget")
            if line.is_empty():
                continue
            x = line["budget"].to_numpy()
            y = line["mean"].to_numpy()
            err = np.vstack([y - line["lo"].to_numpy(), line["hi"].to_numpy() - y])
            err = np.where(np.isnan(err), 0.0, err)
            ax.errorbar(x, y, yerr=err, color=color_for(method, i), marker="o", ms=3, lw=1.2, capsize=2,
                        label=METHOD_LABELS.get(method, method))  # fmt: skip
        ax.set_xscale("log")
        if log_y and not data.filter(pl.col("metric") == shown, pl.col("mean") > 0).is_empty():
            ax.set_yscale("log")
        ax.set_xlabel("lr × steps / rms(W0)", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(True, lw=0.3, alpha=0.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_below(fig, handles, labels)
    n = int(data["n_seeds"].max()) if not data.is_empty() else 0
    seeds = f"{n} seed" + ("s" if n != 1 else "")
    fig.suptitle(f"Geometry of the final update against the update budget (mean over {seeds}, 95% t interval)")
    save(fig, out_prefix, dpi=dpi)
    return data


def cluster_budget(lr: float, steps: int, weight_rms: float = 0.02) -> dict[str, float]:
    """The same ratios for another recipe (default: Qwen3's initializer range as the weight scale)."""
    return {"lr_over_rms": lr / weight_rms, "budget": lr * steps / weight_rms, "rms": weight_rms}
