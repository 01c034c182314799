"""DIR/index.html: one self-contained page (figures as base64 PNG, tables as HTML, no external resource)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import polars as pl

from opdgeom.io import write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
table.data th { background: #f4f4f4; } table.data td.text { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } code { font-size: 0.9em; } .note { color: #8a5a00; }
"""
MAX_ROWS = 60


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "<td>NaN</td>"
        return f"<td>{value:.6g}</td>"
    if value is None:
        return "<td>–</td>"
    if isinstance(value, int):
        return f"<td>{value}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>'


def html_table(frame: pl.DataFrame, caption: str, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.head(MAX_ROWS).iter_rows())
    more = f"<p>… {frame.height - MAX_ROWS} more rows in the parquet tables.</p>" if frame.height > MAX_ROWS else ""
    return (
        f'<table class="data" id="{table_id}"><caption>{html.escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def module_summary(compare: pl.DataFrame) -> pl.DataFrame:
    """Per module type: parameter-weighted mean of each compare metric over the layer matrices."""
    rows = compare.filter(~pl.col("tensor").str.contains(":"), pl.col("kind") == "matrix")
    if rows.is_empty():
        return pl.DataFrame({"metric": []})
    return (
        rows.group_by("module", "metric")
        .agg(value=(pl.col("value") * pl.col("parameters")).sum() / pl.col("parameters").sum())
        .sort("module")
        .pivot(on="module", index="metric", values="value")
        .sort("metric")
    )


def trajectory_summary(trajectory: pl.DataFrame) -> pl.DataFrame:
    """Per step: median over layer matrices of each trajectory metric."""
    rows = trajectory.filter(pl.col("kind") == "matrix", pl.col("layer").is_not_null())
    if rows.is_empty():
        return pl.DataFrame({"step": []})
    return (
        rows.with_columns(value=pl.col("value").fill_nan(None))
        .group_by("step", "metric")
        .agg(pl.col("value").median())
        .pivot(on="metric", index="step", values="value")
        .sort("step")
    )


def _image(prefix: Path) -> str:
    data = base64.b64encode(Path(f"{prefix}.png").read_bytes()).decode()
    return f'<img alt="{html.escape(prefix.name)}" src="data:image/png;base64,{data}">'


def _inputs(summary: dict) -> str:
    base = summary["base"]
    parts = [f"<p>Base: <code>{html.escape(base['spec'])}</code> — {html.escape(base['resolved'])}</p>"]
    runs = pl.DataFrame(
        [
            {
                "run": r["name"],
                "layout": r["layout"],
                "checkpoints": len(r["checkpoints"]),
                "steps": ", ".join(str(c["step"]) for c in r["checkpoints"]),
                "source": r["source"],
            }
            for r in summary["runs"]
        ]
    )
    parts.append(html_table(runs, "Runs and the layout detected for each", "runs"))
    for r in summary["runs"]:
        for note in r["notes"]:
            parts.append(f'<p class="note">{html.escape(r["name"])}: {html.escape(note)}</p>')
    settings = summary["settings"]
    cache = summary.get("cache")
    cache_text = f"; statistics cache: {cache['computed']} computed, {cache['reused']} reused" if cache else ""
    parts.append(
        f"<p>k = {settings['k']}, alpha = {settings['alpha']}, eta = {settings['eta']}, "
        f"trajectory K = {settings['trajectory_k']}{html.escape(cache_text)}.</p>"
    )
    return "\n".join(parts)


def write_page(summary: dict, tables: dict[str, dict], figures: dict[str, dict], path: Path) -> Path:
    body = ["<h1>opdgeom diagnose: how training moved the weights</h1>", _inputs(summary)]
    if "table1" in figures:
        body.append("<h2>Table 1: bf16-aware update sparsity</h2>")
        body.append(html_table(figures["table1"]["data"], "Fraction of weights unchanged (eta = 1e-3)", "table1"))
    body.append("<h2>Final checkpoint vs. base, per module type</h2>")
    for run, pair in tables.items():
        caption = f"{run}: parameter-weighted mean over layer matrices"
        body.append(html_table(module_summary(pair["compare"]), caption, f"compare-{run}"))
    body.append("<h2>Trajectory of the cumulative update</h2>")
    for run, pair in tables.items():
        caption = f"{run}: median over layer matrices of dW_t = W_t - W_base"
        body.append(html_table(trajectory_summary(pair["trajectory"]), caption, f"trajectory-{run}"))
    body.append("<h2>Figures</h2>")
    for name, figure in figures.items():
        if name == "table1":
            continue
        body.append(
            f'<figure id="figure-{name}">{_image(figure["prefix"])}'
            f"<figcaption><b>{html.escape(name)}</b>: {html.escape(figure['doc'])} "
            f'(<a href="figures/{name}.pdf">PDF</a>, <a href="figures/{name}.csv">data</a>)</figcaption></figure>'
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>opdgeom diagnose</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return write_text(page, path)
