"""Held-out accuracy over training for every run, with the student base and teacher as references."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from opdgeom.figures.style import color_for, new_figure, save
from opdgeom.io import write_text


def accuracy_figure(inputs: list[Path], out_prefix: Path, methods: dict[str, str], references: dict[str, str]):
    """``methods``: run -> method (colour); ``references``: ref -> label drawn as a flat line."""
    table = pl.concat([pl.read_parquet(p) for p in inputs], how="diagonal_relaxed")
    write_text(table.write_csv(), Path(f"{out_prefix}.csv"))
    fig, ax = new_figure()
    for i, (run, method) in enumerate(methods.items()):
        rows = table.filter(pl.col("ref") == run).sort("step")
        if rows.is_empty():
            raise ValueError(f"accuracy figure: no evaluation rows for run {run!r}")
        ax.plot(rows["step"], rows["accuracy"], marker="o", ms=3, color=color_for(method, i), label=run)
    for ref, label in references.items():
        rows = table.filter(pl.col("ref") == ref)
        if rows.is_empty():
            raise ValueError(f"accuracy figure: no evaluation rows for reference {ref!r}")
        ax.axhline(rows["accuracy"][-1], ls="--", lw=1, color=color_for(label), label=f"{label} ({ref})")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy over training, per run")
    ax.legend(loc="best", frameon=False)
    return save(fig, out_prefix)
