"""Reading and checking the long-format tables the figures draw, and the summaries they use.

Every check raises ValueError naming the figure and the file, run or metric at fault, so a
failed figure job says what to fix.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from opdgeom.io import write_text
from opdgeom.spec import run_group

GEOMETRY_COLUMNS = ("run", "tensor", "kind", "layer", "module", "metric", "parameters", "value")
EVAL_COLUMNS = ("ref", "step", "accuracy")
# Canonical order of module types on figure axes; others follow alphabetically.
MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_tables(figure: str, inputs: list[Path], columns: tuple[str, ...], key: str = "run") -> pl.DataFrame:
    """Concatenate the input parquet files, each tagged with its ``source`` path.

    Raises ValueError when there are no inputs, a file is empty or lacks a column, or one
    ``key`` (run) appears in more than one file (its rows would be counted twice).
    """
    if not inputs:
        raise ValueError(f"{figure}: no input tables")
    frames = []
    owner: dict[str, str] = {}
    for path in inputs:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"{figure}: input table {path} does not exist")
        table = pl.read_parquet(path)
        if table.is_empty():
            raise ValueError(f"{figure}: input table {path} is empty")
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"{figure}: input table {path} lacks column(s) {missing}")
        for name in table[key].unique().to_list():
            if name in owner:
                raise ValueError(f"{figure}: {key} {name!r} appears in both {owner[name]} and {path}")
            owner[name] = str(path)
        frames.append(table.with_columns(source=pl.lit(str(path))))
    return pl.concat(frames, how="diagonal_relaxed")


def sources(table: pl.DataFrame, run: str | None = None, key: str = "run") -> str:
    rows = table if run is None else table.filter(pl.col(key) == run)
    return ", ".join(sorted(set(rows["source"].to_list()))) or "(no file)"


def check_methods(figure: str, methods: dict[str, str] | None) -> dict[str, str]:
    if not methods:
        raise ValueError(f"{figure}: option 'methods' (run -> method) is missing or empty")
    return dict(methods)


def select_runs(figure: str, methods: dict[str, str], runs: list[str] | None) -> list[str]:
    """``runs`` (default: every run of ``methods``, config order); each must be a run of ``methods``."""
    if runs is None:
        return list(methods)
    if not runs:
        raise ValueError(f"{figure}: option 'runs' is empty")
    unknown = [r for r in runs if r not in methods]
    if unknown:
        raise ValueError(f"{figure}: run(s) {unknown} in option 'runs' are not in option 'methods'")
    return list(runs)


def require_runs(figure: str, table: pl.DataFrame, runs: list[str], key: str = "run") -> None:
    present = set(table[key].unique().to_list())
    missing = [r for r in runs if r not in present]
    if missing:
        raise ValueError(f"{figure}: {key}(s) {missing} not found in the input tables ({sources(table)})")


def metric_rows(figure: str, table: pl.DataFrame, metric: str, runs: list[str], **equal) -> pl.DataFrame:
    """Rows of ``metric`` (and column == value for each ``equal``) for ``runs``; every run must have some."""
    rows = table.filter(pl.col("metric") == metric, pl.col("run").is_in(runs))
    for column, value in equal.items():
        rows = rows.filter(pl.col(column) == value)
    where = "".join(f", {c}={v!r}" for c, v in equal.items())
    if rows.is_empty():
        raise ValueError(f"{figure}: metric {metric!r}{where} missing from every input table ({sources(table)})")
    have = set(rows["run"].unique().to_list())
    for run in runs:
        if run not in have:
            raise ValueError(f"{figure}: metric {metric!r}{where} missing for run {run!r} ({sources(table, run)})")
    return rows


def layer_matrices(rows: pl.DataFrame) -> pl.DataFrame:
    """Per-tensor rows of 2-D layer matrices (no aggregates, embeddings, lm_head or vectors)."""
    return rows.filter(pl.col("kind") == "matrix", pl.col("layer").is_not_null(), ~pl.col("tensor").str.contains(":"))


def weighted_mean(value: pl.Expr = pl.col("value")) -> pl.Expr:
    """Parameter-weighted mean of ``value`` over a group's tensors; null values carry no weight."""
    return (value * pl.col("parameters")).sum() / pl.col("parameters").filter(value.is_not_null()).sum()


def summarise(rows: pl.DataFrame, by: list[str], how: str) -> pl.DataFrame:
    """One value per ``by`` group from per-matrix ``value``s. NaN values are left out and counted in n.

    how: "median" (also q25/q75), "mean", "max", "weighted_mean" (by ``parameters``), or
    "root_sum_square" (sqrt of the summed squares: the Frobenius norm of all matrices together).
    """
    value = pl.col("value")
    exprs = {
        "median": [
            value.median(),
            value.quantile(0.25, interpolation="linear").alias("q25"),
            value.quantile(0.75, interpolation="linear").alias("q75"),
        ],
        "mean": [value.mean()],
        "max": [value.max()],
        "weighted_mean": [weighted_mean(value)],
        "root_sum_square": [(value**2).sum().sqrt()],
    }
    if how not in exprs:
        raise ValueError(f"unknown summary {how!r}; expected one of {sorted(exprs)}")
    finite = rows.with_columns(value=pl.col("value").fill_nan(None))
    out = finite.group_by(by, maintain_order=True).agg(
        exprs[how][0].alias("value"),
        *exprs[how][1:],
        n_matrices=pl.col("value").count(),
        n_nan=pl.col("value").null_count(),
    )
    if how == "median":
        return out
    return out.with_columns(q25=pl.lit(None, pl.Float64), q75=pl.lit(None, pl.Float64))


def module_order(modules) -> list[str]:
    modules = set(modules)
    return [m for m in MODULE_ORDER if m in modules] + sorted(modules - set(MODULE_ORDER))


def run_order(runs: list[str]) -> pl.Expr:
    """Sort key putting runs in the given (config) order."""
    return pl.col("run").replace_strict({r: i for i, r in enumerate(runs)}, default=len(runs), return_dtype=pl.Int64)


def write_csv(table: pl.DataFrame, out_prefix: Path) -> Path:
    return write_text(table.write_csv(), Path(f"{out_prefix}.csv"))


def seed_group(run: str) -> str:
    """The config entry a run is a seed replicate of ("opd.s1" -> "opd"); other runs are their own."""
    return run_group(run)


def groups_of(runs: list[str]) -> dict[str, list[str]]:
    """Config entry -> its runs (seed replicates), in the order of ``runs``."""
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(seed_group(run), []).append(run)
    return out


def over_seeds(per_run: pl.DataFrame, by: list[str], value: str = "value") -> pl.DataFrame:
    """Per ``by`` + group: mean over the group's runs and a t interval (lo, hi; NaN for one seed)."""
    from opdgeom.stats import seed_interval

    rows = []
    table = per_run.with_columns(group=pl.col("run").map_elements(seed_group, return_dtype=pl.String))
    for key, part in table.group_by(["group", *by], maintain_order=True):
        ci = seed_interval(part[value].cast(pl.Float64).fill_null(float("nan")).to_list())
        rows.append({**dict(zip(["group", *by], key)), "mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "n_seeds": ci.n})
    return pl.DataFrame(rows)
