"""Held-out accuracy over training for every run, with the student base and teacher as references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from opdgeom.figures.style import color_for, legend_below, legend_height, new_figure, run_styles, save
from opdgeom.figures.tables import groups_of
from opdgeom.io import write_text
from opdgeom.stats import bootstrap_interval


def accuracy_figure(
    inputs: list[Path], out_prefix: Path, methods: dict[str, str], references: dict[str, str], dpi: int = 200
):
    """``methods``: run -> method (colour; line style and marker per run); ``references``: ref -> label
    drawn as a flat line at its last evaluated accuracy. CSV: the evaluation tables, concatenated."""
    table = pl.concat([pl.read_parquet(p) for p in inputs], how="diagonal_relaxed")
    present = set(table["ref"].unique().to_list())
    for kind, refs in (("run", methods), ("reference", references)):
        missing = [r for r in refs if r not in present]
        if missing:
            raise ValueError(f"accuracy figure: no evaluation rows for {kind}(s) {missing} in {list(map(str, inputs))}")
    per_prompt = [name for name, dtype in table.schema.items() if isinstance(dtype, pl.List)]  # not CSV cells
    write_text(table.drop(per_prompt).write_csv(), Path(f"{out_prefix}.csv"))
    group_runs = groups_of(list(methods))
    group_methods = {g: methods[runs[0]] for g, runs in group_runs.items()}
    styles = run_styles(group_methods)
    labels = [*group_runs, *(f"{label} ({ref})" for ref, label in references.items())]
    fig, ax = new_figure(height_in=2.3 + legend_height(labels))
    for group, runs in group_runs.items():
        steps, mean, lo, hi = _band(table, runs)
        label = f"{group} ({len(runs)} seeds)" if len(runs) > 1 else group
        ax.plot(steps, mean, label=label, **styles[group].line())
        ax.fill_between(steps, lo, hi, color=styles[group].color, alpha=0.2, lw=0)
    for i, (ref, label) in enumerate(references.items()):
        rows = table.filter(pl.col("ref") == ref).sort("step")
        if rows.is_empty():
            raise ValueError(f"accuracy figure: no evaluation rows for reference {ref!r}")
        _, mean, lo, hi = _band(table, [ref])
        color = color_for(label, i)
        ax.axhline(mean[-1], ls="--", lw=1, color=color, label=f"{label} ({ref})")
        ax.axhspan(lo[-1], hi[-1], color=color, alpha=0.12, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (fraction correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Held-out accuracy over training (greedy decoding)\nmean over seeds, 95% bootstrap over prompts")
    ax.grid(True, lw=0.3, alpha=0.5)
    handles, labels = ax.get_legend_handles_labels()
    legend_below(fig, handles, labels)
    return save(fig, out_prefix, dpi=dpi)


def _band(table: pl.DataFrame, runs: list[str]):
    """Per step: accuracy averaged over ``runs`` (seeds) and its bootstrap interval over prompts
    (no band when the tables carry no per-prompt outcomes)."""
    rows = table.filter(pl.col("ref").is_in(runs)).sort("step")
    if rows.is_empty():
        raise ValueError(f"accuracy figure: no evaluation rows for run(s) {runs}")
    steps, mean, lo, hi = [], [], [], []
    for step in sorted(rows["step"].unique().to_list()):
        at = rows.filter(pl.col("step") == step)
        if "correct" in at.columns and at["correct"].null_count() == 0:
            ci = bootstrap_interval(np.stack([np.asarray(c, dtype=np.float64) for c in at["correct"].to_list()]))
            m, low, high = ci.mean, ci.lo, ci.hi
        else:
            m = float(at["accuracy"].mean())
            low = high = m
        steps.append(step)
        mean.append(m)
        lo.append(low)
        hi.append(high)
    return steps, mean, lo, hi
