"""Held-out accuracy over training for every run, with the student base and teacher as references."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from opdgeom.figures.style import color_for, legend_below, legend_height, new_figure, run_styles, save
from opdgeom.io import write_text


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
    write_text(table.write_csv(), Path(f"{out_prefix}.csv"))
    styles = run_styles(methods)
    labels = [*methods, *(f"{label} ({ref})" for ref, label in references.items())]
    fig, ax = new_figure(height_in=2.3 + legend_height(labels))
    for run in methods:
        rows = table.filter(pl.col("ref") == run).sort("step")
        if rows.is_empty():
            raise ValueError(f"accuracy figure: no evaluation rows for run {run!r}")
        ax.plot(rows["step"], rows["accuracy"], label=run, **styles[run].line())
    for i, (ref, label) in enumerate(references.items()):
        rows = table.filter(pl.col("ref") == ref).sort("step")
        if rows.is_empty():
            raise ValueError(f"accuracy figure: no evaluation rows for reference {ref!r}")
        ax.axhline(rows["accuracy"][-1], ls="--", lw=1, color=color_for(label, i), label=f"{label} ({ref})")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (fraction correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Held-out accuracy over training (greedy decoding)")
    ax.grid(True, lw=0.3, alpha=0.5)
    handles, labels = ax.get_legend_handles_labels()
    legend_below(fig, handles, labels)
    return save(fig, out_prefix, dpi=dpi)
