"""Trajectories of the cumulative update dW_t = W_t - W_0 over training, one line per run.

Figures 4a-c, 5 and 7a-c are one function configured by an entry of TRAJECTORY_FIGURES
(metric, how matrices are summarised, axis labels); a new panel is a new entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from opdgeom.figures.frame import Frame
from opdgeom.figures.style import legend_below, legend_height, new_figure, run_styles, save
from opdgeom.figures.tables import GEOMETRY_COLUMNS, groups_of, over_seeds, run_order, summarise, write_csv


@dataclass(frozen=True)
class TrajectoryPanel:
    """One trajectory figure; "<k>" in ylabel/title is replaced by the figure's option ``k``."""

    metric: str
    summary: str  # see opdgeom.figures.tables.summarise
    ylabel: str
    title: str
    log_y: bool = False
    ylim: tuple[float, float] | None = None


SUMMARY_TEXT = {
    "median": "median over matrices",
    "mean": "mean over matrices",
    "max": "max over matrices",
    "root_sum_square": "all matrices together",
}

STABLE_RANK = r"stable rank $\|\Delta W\|_F^2/\|\Delta W\|_2^2$"

TRAJECTORY_FIGURES = {
    "fig4a": TrajectoryPanel("stable_rank", "median", STABLE_RANK, "Stable rank of the cumulative update"),
    "fig4b": TrajectoryPanel(
        "frobenius_norm",
        "root_sum_square",
        r"update norm $\sqrt{\sum_i \|\Delta W_i\|_F^2}$",
        "Size of the cumulative update",
        log_y=True,
    ),
    "fig4c": TrajectoryPanel(
        "tail_index",
        "median",
        r"tail index $\alpha$ of $\sigma(\Delta W)^2$ (power-law MLE)",
        "Heavy-tailedness of the cumulative update",
    ),
    "fig5": TrajectoryPanel(
        "subspace_similarity_to_final",
        "median",
        r"subspace similarity $\mathrm{Sim}_{<k>}(t, T)$",
        "Top-<k> right subspace of the update: step t vs. final",
        ylim=(-0.02, 1.02),
    ),
    "fig7a": TrajectoryPanel("stable_rank", "median", STABLE_RANK, "Token sparsification: stable rank"),
    "fig7b": TrajectoryPanel("stable_rank", "median", STABLE_RANK, "Off-policy rollouts: stable rank"),
    "fig7c": TrajectoryPanel("stable_rank", "median", STABLE_RANK, "Objective mixing: stable rank"),
}


def trajectory_figure(
    inputs: list[Path],
    out_prefix: Path,
    panel: TrajectoryPanel,
    name: str,
    methods: dict[str, str],
    runs: list[str] | None = None,
    log_y: bool | None = None,
    k: int = 16,
    dpi: int = 200,
) -> pl.DataFrame:
    """x = training step, y = ``panel.metric`` summarised over layer matrices, one line per run.

    ``k``: the diagnostics' subspace size K (labels only, fig5); ``log_y`` overrides the panel's y scale.
    """
    frame = Frame.open(name, inputs, methods, runs, columns=(*GEOMETRY_COLUMNS, "step"))
    runs = frame.runs
    per_step = summarise(frame.matrices(panel.metric), ["run", "step"], panel.summary)
    data = (
        frame.with_method(per_step, metric=panel.metric, summary=panel.summary)
        .sort(run_order(runs), "step")
        .select("run", "method", "step", "metric", "summary", "value", "q25", "q75", "n_matrices", "n_nan")
    )
    write_csv(data, out_prefix)

    group_runs = groups_of(runs)
    group_methods = {g: frame.methods[rs[0]] for g, rs in group_runs.items()}
    styles = run_styles(group_methods)
    fig, ax = new_figure(height_in=2.3 + legend_height([f"{g} (3 seeds)" for g in group_runs]))
    seeded = over_seeds(data, ["step"]).sort("step")
    for group, members in group_runs.items():
        line = seeded.filter(pl.col("group") == group)
        label = f"{group} ({len(members)} seeds)" if len(members) > 1 else group
        ax.plot(line["step"], line["mean"], label=label, **styles[group].line())
        if len(members) > 1:
            ax.fill_between(line["step"], line["lo"], line["hi"], color=styles[group].color, alpha=0.2, lw=0)
    if (panel.log_y if log_y is None else log_y) and not data.filter(pl.col("value") > 0).is_empty():
        ax.set_yscale("log")
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    ax.set_xlabel("training step")
    ax.set_ylabel(panel.ylabel.replace("<k>", str(k)))
    title = panel.title.replace("<k>", str(k))
    ax.set_title(f"{title}\n($\\Delta W_t = W_t - W_0$; {SUMMARY_TEXT[panel.summary]})")
    ax.grid(True, lw=0.3, alpha=0.5)
    handles, labels = ax.get_legend_handles_labels()
    legend_below(fig, handles, labels)
    save(fig, out_prefix, dpi=dpi)
    return data


def make_trajectory_figure(name: str):
    """The registered figure function of one TRAJECTORY_FIGURES entry."""
    panel = TRAJECTORY_FIGURES[name]

    def figure(inputs: list[Path], out_prefix: Path, **options) -> pl.DataFrame:
        return trajectory_figure(inputs, out_prefix, panel, name, **options)

    figure.__name__ = f"{name}_figure"
    figure.__doc__ = (
        f"{name}: {panel.title} ({panel.metric}, {SUMMARY_TEXT[panel.summary]}) over training steps.\n\n"
        "Options: methods (run -> method), runs (default: all of methods), log_y, k (fig5 labels), dpi.\n"
        "CSV: run, method, step, metric, summary, value, q25, q75, n_matrices, n_nan."
    )
    return figure
