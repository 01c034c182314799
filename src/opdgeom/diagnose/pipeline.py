"""``opdgeom diagnose``: the study's tables, figures and one HTML page for checkpoints trained anywhere.

Every input is resolved and aligned before the first statistic is computed, so a bad checkpoint fails
in seconds, and the output folder is built beside DIR and renamed into place only when complete.
Statistics go through the content-addressed cache, so a second call with one more checkpoint
computes that checkpoint's statistics only.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from opdgeom.diagnose.align import Aligner, View
from opdgeom.diagnose.lora import lora_source
from opdgeom.diagnose.sources import Run, detect_run, resolve_model
from opdgeom.geometry.cache import StatCache
from opdgeom.geometry.compare import compare_checkpoints
from opdgeom.geometry.trajectory import trajectory_table
from opdgeom.io import atomic_dir, write_parquet, write_text

COMPARE_FIGURES = ("table1", "rotation", "drift", "localization", "heatmap")
TRAJECTORY_FIGURES = ("fig4a", "fig4b", "fig4c", "fig5")


@dataclass
class Settings:
    k: int = 16
    alpha: float = 0.05
    eta: float = 1e-3
    trajectory_k: int = 16
    device: str = "cpu"
    cache: str | Path | None = None  # None: $OPDGEOM_CACHE or ~/.cache/opdgeom/geometry
    use_cache: bool = True
    allow_download: bool = False
    progress: bool = True


@dataclass
class Prepared:
    run: Run
    base: View
    views: list[View]


def file_name(run: str) -> str:
    return re.sub(r"[^\w.-]+", "_", run)


def unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name}-{count + 1}"


def prepare(base_folder: Path, run: Run) -> Prepared:
    """Align every checkpoint of ``run`` with the base (raises ValueError naming what does not fit)."""
    aligner = Aligner(base_folder)
    sources = [
        lora_source(c.path, aligner.base_keys, aligner.notes) if c.adapter else aligner.folder_source(c.path)
        for c in run.checkpoints
    ]
    base_view, views = aligner.align(sources)
    run.notes.extend(dict.fromkeys(aligner.notes))
    return Prepared(run, base_view, views)


class Progress:
    """One tqdm bar over every tensor of every table, on stderr, with an ETA."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="tensor", file=sys.stderr, disable=not enabled, dynamic_ncols=True)

    def stage(self, text: str):
        self.bar.set_description(text)
        return lambda name: self.bar.update(1)

    def close(self):
        self.bar.close()


def compute_tables(prepared: list[Prepared], settings: Settings, cache: StatCache | None) -> dict[str, dict]:
    total = sum(2 * len(p.base.entries) for p in prepared)
    progress = Progress(total, settings.progress)
    tables = {}
    try:
        for p in prepared:
            last = p.run.checkpoints[-1]
            compare = compare_checkpoints(
                p.base, p.views[-1], k=settings.k, alpha=settings.alpha, eta=settings.eta, cache=cache,
                device=settings.device, progress=progress.stage(f"{p.run.name}: compare step {last.step}"),
            )  # fmt: skip
            compare = compare.with_columns(run=pl.lit(p.run.name), step=pl.lit(last.step, dtype=pl.Int64))
            by_step = {0: p.base, **{c.step: v for c, v in zip(p.run.checkpoints, p.views)}}
            trajectory = trajectory_table(
                by_step, K=settings.trajectory_k, cache=cache, device=settings.device,
                progress=progress.stage(f"{p.run.name}: trajectory of {len(p.views)} checkpoints"),
            )  # fmt: skip
            tables[p.run.name] = {"compare": compare, "trajectory": trajectory.with_columns(run=pl.lit(p.run.name))}
    finally:
        progress.close()
    return tables


def has_layer_matrices(table: pl.DataFrame, metric: str) -> bool:
    rows = table.filter(
        pl.col("metric") == metric,
        pl.col("kind") == "matrix",
        pl.col("layer").is_not_null(),
        pl.col("value").is_not_nan(),
    )
    return not rows.is_empty()


def figure_plan(tables: dict[str, dict], settings: Settings) -> list[tuple[str, str, dict]]:
    """(figure, table kind, options) for every figure the tables can draw; options as plan.figure_options."""
    compare = pl.concat([t["compare"] for t in tables.values()], how="diagonal_relaxed")
    trajectory = pl.concat([t["trajectory"] for t in tables.values()], how="diagonal_relaxed")
    methods = {run: run for run in tables}
    derived = {
        "rotation": {"k": settings.k},
        "localization": {"alpha": settings.alpha},
        "fig5": {"k": settings.trajectory_k},
    }
    needs = {
        "table1": None,
        "rotation": "principal_angle_left_max",
        "drift": "spectral_shift",
        "localization": "mask_overlap_principal",
        "heatmap": "spectral_shift",
        "fig4a": "stable_rank",
        "fig4b": "frobenius_norm",
        "fig4c": "tail_index",
        "fig5": "subspace_similarity_to_final",
    }
    plan = []
    for name in (*COMPARE_FIGURES, *TRAJECTORY_FIGURES):
        kind = "compare" if name in COMPARE_FIGURES else "trajectory"
        table = compare if kind == "compare" else trajectory
        metric = needs[name]
        if metric is None or has_layer_matrices(table, metric):
            plan.append((name, kind, {"methods": methods, **derived.get(name, {})}))
    return plan


def draw_figures(tables, paths, settings, figures_dir: Path) -> dict[str, dict]:
    """Call the study's figure functions (opdgeom.figures.FIGURES) on the written tables."""
    from opdgeom.figures import FIGURES

    drawn = {}
    for name, kind, options in figure_plan(tables, settings):
        prefix = figures_dir / name
        data = FIGURES[name](inputs=[paths[run][kind] for run in tables], out_prefix=prefix, **options)
        drawn[name] = {"data": data, "prefix": prefix, "doc": (FIGURES[name].__doc__ or "").strip().splitlines()[0]}
    return drawn


def write_outputs(
    tmp: Path, base: str, base_folder: Path, base_how: str, runs: list[Run], tables: dict[str, dict],
    settings: Settings, cache: StatCache | None, started: float, counted_from: tuple[int, int] = (0, 0),
) -> dict:  # fmt: skip
    """The page's files in ``tmp``: tables/, figures/, inputs.json, then index.html (it embeds the figures,
    so it is written last). ``counted_from``: the cache's (hits, misses) before this page's work."""
    from opdgeom.diagnose.report import write_page

    paths = {}
    for run, pair in tables.items():
        paths[run] = {kind: tmp / "tables" / f"{kind}-{file_name(run)}.parquet" for kind in pair}
        for kind, table in pair.items():
            write_parquet(table, paths[run][kind])
    figures = draw_figures(tables, paths, settings, tmp / "figures")
    hits, misses = counted_from
    summary = {
        "base": {"spec": base, "folder": str(base_folder), "resolved": base_how},
        "runs": [
            {
                "name": r.name,
                "layout": r.layout,
                "source": r.source,
                "notes": r.notes,
                "checkpoints": [{"step": c.step, "path": str(c.path), "adapter": c.adapter} for c in r.checkpoints],
            }
            for r in runs
        ],  # fmt: skip
        "settings": {k: v for k, v in vars(settings).items() if k != "progress"}
        | {"cache": str(cache.root) if cache else None},
        "cache": {"computed": cache.misses - misses, "reused": cache.hits - hits} if cache else None,
        "figures": list(figures),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_text(json.dumps(summary, indent=2, default=str), tmp / "inputs.json")
    write_page(summary, tables, figures, tmp / "index.html")
    return summary


def diagnose(base: str, run_args: list[str], out: str | Path, settings: Settings | None = None) -> dict:
    """Resolve, align, compute, draw, write DIR (tables/, figures/, inputs.json, index.html); returns a summary."""
    settings = settings or Settings()
    started = time.perf_counter()
    if not run_args:
        raise ValueError("diagnose: give at least one RUN")
    base_folder, base_how = resolve_model(base, settings.allow_download)
    runs = [detect_run(arg, settings.allow_download) for arg in run_args]
    unique_names(runs)
    prepared = [prepare(base_folder, run) for run in runs]
    for run in runs:
        print(f"{run.name}: {run.layout} run, {len(run.checkpoints)} checkpoint(s) in {run.source}", file=sys.stderr)
        for note in run.notes:
            print(f"  note: {note}", file=sys.stderr)
    cache = StatCache(settings.cache) if settings.use_cache else None
    tables = compute_tables(prepared, settings, cache)
    out = Path(out)
    with atomic_dir(out) as tmp:
        summary = write_outputs(tmp, base, base_folder, base_how, runs, tables, settings, cache, started)
    if cache is not None:
        print(f"statistics cache {cache.root}: {cache.misses} computed, {cache.hits} reused", file=sys.stderr)
    figures, seconds = len(summary["figures"]), summary["seconds"]
    print(f"wrote {out / 'index.html'} ({figures} figures, {seconds:.1f} s)", file=sys.stderr)
    return summary
