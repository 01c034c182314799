"""Functional sufficiency (fig6): accuracy over training with and without subspace projection."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from opdgeom.figures.style import color_for, legend_below, new_grid, run_styles, save
from opdgeom.figures.tables import EVAL_COLUMNS, check_methods, read_tables, sources, write_csv

NAME = "fig6"


def sufficiency_figure(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    groups: dict[str, list[str]] | None = None,
    references: dict[str, str] | None = None,
    domain: str | None = None,
    rank: int = 16,
    dpi: int = 200,
) -> pl.DataFrame:
    """One panel per group (e.g. {"OPD": ["opd", "opd.projgrad", "opd.projupdate"], "SFT": [...]}).

    Each panel: held-out accuracy over training steps of the group's runs (first = unconstrained).
    ``references``: optional {ref: label} drawn as flat dashed lines (last evaluated step) in every panel;
    ``domain``: the evaluation domain to draw when a table holds several; ``rank``: projection rank (title).
    CSV: group, run, method, step, tokens, domain, accuracy, n.
    """
    methods = check_methods(NAME, methods)
    if not groups:
        raise ValueError(f"{NAME}: option 'groups' (panel title -> runs) is missing or empty")
    references = dict(references or {})
    for group, runs in groups.items():
        if not runs:
            raise ValueError(f"{NAME}: group {group!r} lists no runs")
        unknown = [r for r in runs if r not in methods]
        if unknown:
            raise ValueError(f"{NAME}: run(s) {unknown} of group {group!r} are not in option 'methods'")
    table = read_tables(NAME, inputs, EVAL_COLUMNS, key="ref")
    if domain is not None:
        if "domain" not in table.columns:
            raise ValueError(f"{NAME}: option 'domain' given but the input tables have no 'domain' column")
        table = table.filter(pl.col("domain") == domain)
    for col, dtype in (("tokens", pl.Int64), ("domain", pl.String), ("n", pl.Int64)):
        if col not in table.columns:
            table = table.with_columns(pl.lit(None, dtype).alias(col))

    def rows_of(ref: str) -> pl.DataFrame:
        rows = table.filter(pl.col("ref") == ref).sort("step")
        if rows.is_empty():
            where = f" for domain {domain!r}" if domain else ""
            raise ValueError(f"{NAME}: no evaluation rows{where} for {ref!r} in the input tables ({sources(table)})")
        if rows["domain"].n_unique() > 1:
            raise ValueError(
                f"{NAME}: {ref!r} is evaluated on several domains {rows['domain'].unique().to_list()} "
                f"({sources(table, ref, key='ref')}); choose one with option 'domain'"
            )
        return rows

    parts = []
    for group, runs in groups.items():
        for run in runs:
            parts.append(
                rows_of(run).select(
                    group=pl.lit(group),
                    run="ref",
                    method=pl.lit(methods[run]),
                    step="step",
                    tokens="tokens",
                    domain="domain",
                    accuracy="accuracy",
                    n="n",
                )
            )
    for ref, label in references.items():
        parts.append(
            rows_of(ref)
            .tail(1)
            .select(
                group=pl.lit("reference"),
                run="ref",
                method=pl.lit(label),
                step="step",
                tokens="tokens",
                domain="domain",
                accuracy="accuracy",
                n="n",
            )
        )
    data = pl.concat(parts, how="vertical_relaxed")
    write_csv(data, out_prefix)

    styles = run_styles(methods, list(dict.fromkeys(r for runs in groups.values() for r in runs)))
    fig, axes = new_grid(1, len(groups), height_in=2.6, sharey=True, double=len(groups) > 1)
    handles: dict[str, object] = {}
    for ax, (group, runs) in zip(axes[0], groups.items()):
        for run in runs:
            line = data.filter(pl.col("group") == group, pl.col("run") == run)
            (h,) = ax.plot(line["step"], line["accuracy"], label=run, **styles[run].line())
            handles.setdefault(run, h)
        for i, (ref, label) in enumerate(references.items()):
            value = data.filter(pl.col("group") == "reference", pl.col("run") == ref)["accuracy"][0]
            h = ax.axhline(value, ls="--", lw=0.9, color=color_for(label, i))
            handles.setdefault(f"{label} ({ref})", h)
        ax.set_title(f"{group}: unconstrained vs. projected onto top-{rank} subspace")
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, lw=0.3, alpha=0.5)
    axes[0][0].set_ylabel("held-out accuracy (fraction correct)")
    fig.suptitle(
        "Functional sufficiency: accuracy when every update is confined to a fixed low-rank subspace", fontsize=8
    )
    legend_below(fig, list(handles.values()), list(handles))
    save(fig, out_prefix, dpi=dpi)
    return data
