"""How the cumulative update dW_t = W_t - W_0 of a training run grows, tensor by tensor.

For each 2-D layer matrix and each saved step t after the first: ||dW_t||_F, its stable
rank ||dW||_F^2 / ||dW||_op^2, the WeightWatcher tail index of its singular values
(see opdgeom.geometry.tail), and Sim_K(t, T) = (1/K) ||V_K(t)^T V_K(T)||_F^2 between its
top-K right singular vectors and those of the final update. Other tensors get the norm only.
One float64 Gram eigendecomposition of dW_t gives all of these; it is cached under the
content hashes of (W_t, W_0), so re-running a trajectory with more steps only pays for the new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from opdgeom.geometry.cache import StatCache, tensor_digest
from opdgeom.geometry.compare import SCHEMA, as_cache
from opdgeom.geometry.rows import metric_row
from opdgeom.geometry.spectral import frobenius_norm, spectrum, stable_rank_from_sigma, subspace_similarity
from opdgeom.geometry.stream import CheckpointSeries
from opdgeom.geometry.tail import tail_index

LOG = logging.getLogger(__name__)
TRAJECTORY_SCHEMA = {"step": pl.Int64, **SCHEMA}
SPECTRAL_KINDS = ("matrix",)


def delta_statistics(w_t: torch.Tensor, w_0: torch.Tensor, k: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Singular values, top-k right singular vectors and Frobenius norm of W_t - W_0 (float64)."""
    dw_mn = w_t.to(torch.float64) - w_0.to(torch.float64)
    spec = spectrum(dw_mn, k, device)
    return {
        "sigma_r": spec.sigma_r,
        "right_nk": spec.right_nk,
        "frobenius_norm": torch.tensor(frobenius_norm(dw_mn), dtype=torch.float64),
    }


def _cached_delta(w_t, w_0, digest_0, k, cache: StatCache | None, device) -> dict[str, torch.Tensor]:
    if cache is None:
        return delta_statistics(w_t, w_0, k, device)
    return cache.get_or_compute(
        [tensor_digest(w_t), digest_0], "delta_spectrum", {"k": k}, lambda: delta_statistics(w_t, w_0, k, device)
    )


def _matrix_rows(series, name, info, steps, k, cache, device) -> list[dict]:
    w_0 = series.load(0, name)
    k_eff = min(k, *w_0.shape)
    digest_0 = tensor_digest(w_0) if cache is not None else ""
    final = _cached_delta(series.load(len(steps) - 1, name), w_0, digest_0, k_eff, cache, device)
    rows = []
    for index, step in enumerate(steps[1:], start=1):
        is_final = index == len(steps) - 1
        stats = final if is_final else _cached_delta(series.load(index, name), w_0, digest_0, k_eff, cache, device)
        norm = float(stats["frobenius_norm"])
        moved = norm > 0 and float(final["frobenius_norm"]) > 0
        values = {
            "frobenius_norm": norm,
            "stable_rank": stable_rank_from_sigma(stats["sigma_r"]),
            "tail_index": tail_index(stats["sigma_r"]),
            "subspace_similarity_to_final": (
                subspace_similarity(stats["right_nk"], final["right_nk"]) if moved else float("nan")
            ),
        }
        rows.extend(metric_row(name, info, metric, w_0.numel(), value, step) for metric, value in values.items())
    return rows


def _norm_rows(series, name, info, steps) -> list[dict]:
    w_0 = series.load(0, name).to(torch.float64)
    return [
        metric_row(name, info, "frobenius_norm", w_0.numel(), frobenius_norm(series.load(index, name) - w_0), step)
        for index, step in enumerate(steps[1:], start=1)
    ]


def trajectory_table(
    checkpoint_dirs_by_step: dict[int, str | Path],
    K: int = 16,
    cache: StatCache | str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Long-format rows (step, tensor, kind, layer, module, metric, parameters, value).

    The smallest step is W_0 (the run's starting point) and gets no rows; the largest is T.
    Metrics: frobenius_norm, stable_rank, tail_index, subspace_similarity_to_final (1 at T;
    NaN where dW or dW_T is zero). Values are folders or checkpoint sources (see
    geometry.stream.FolderCheckpoint); ``progress(name)`` is called after each tensor.
    """
    if len(checkpoint_dirs_by_step) < 2:
        raise ValueError("a trajectory needs at least two checkpoints (the start and one later step)")
    cache = as_cache(cache)
    steps = sorted(checkpoint_dirs_by_step)
    rows = []
    series = CheckpointSeries(checkpoint_dirs_by_step[s] for s in steps)
    for name in series.names:
        info = series.info(name)
        if info.kind in SPECTRAL_KINDS and len(series.shape(name)) == 2:
            LOG.info("trajectory of %s", name)
            rows.extend(_matrix_rows(series, name, info, steps, K, cache, device))
        else:
            rows.extend(_norm_rows(series, name, info, steps))
        if progress is not None:
            progress(name)
    if not rows:
        return pl.DataFrame(schema=TRAJECTORY_SCHEMA)
    return pl.DataFrame(rows, schema=TRAJECTORY_SCHEMA, orient="row")
