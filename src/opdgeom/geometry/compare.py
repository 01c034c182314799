"""Compare two checkpoints tensor by tensor into a long-format polars table.

One row per (tensor, metric); aggregates over module types and tensor kinds are extra
rows whose ``tensor`` is "module:<name>" or "all:<kind>". Only sparsity aggregates
exactly (parameter-weighted unchanged counts / total); the spectral metrics are
reported per matrix and aggregated by the figures, which know what summary they need.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from opdgeom.geometry.cache import StatCache, tensor_digest
from opdgeom.geometry.metrics import BaseMasks, base_masks, overlap_counts, unchanged_count, update_norms
from opdgeom.geometry.rows import metric_row
from opdgeom.geometry.spectral import Spectrum, angles_between, normalized_shift, spectrum
from opdgeom.geometry.stream import TensorInfo, iter_tensor_pairs

LOG = logging.getLogger(__name__)

SCHEMA = {
    "tensor": pl.String,
    "kind": pl.String,
    "layer": pl.Int64,
    "module": pl.String,
    "metric": pl.String,
    "parameters": pl.Int64,
    "value": pl.Float64,
}
SPARSITY = "bf16_sparsity"
DEFAULT_ALPHA = 0.05


def frame(rows: list[dict]) -> pl.DataFrame:
    """Rows to a DataFrame with the fixed long-format schema (also when empty)."""
    return pl.DataFrame(rows, schema=SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCHEMA)


class SparsityTally:
    """Exact parameter-weighted sparsity aggregates per module type (matrices) and per kind."""

    def __init__(self) -> None:
        self._counts = defaultdict(lambda: [0, 0])

    def add(self, info: TensorInfo, unchanged: int, parameters: int) -> None:
        keys = [(f"all:{info.kind}", info.kind, None)]
        if info.kind == "matrix":
            keys.append((f"module:{info.module}", info.kind, info.module))
        for key in keys:
            self._counts[key][0] += unchanged
            self._counts[key][1] += parameters

    def rows(self) -> list[dict]:
        """Module rows first (sorted), then the per-kind rows."""
        keys = sorted(self._counts, key=lambda k: (k[0].startswith("all:"), k[0]))
        rows = []
        for tensor, kind, module in keys:
            unchanged, total = self._counts[(tensor, kind, module)]
            info = TensorInfo(kind=kind, layer=None, module=module)
            rows.append(metric_row(tensor, info, SPARSITY, total, unchanged / total))
        return rows


def sparsity_table(dir_a: str | Path, dir_b: str | Path, eta: float = 1e-3) -> pl.DataFrame:
    """bf16-aware update sparsity of every tensor of B relative to A, plus aggregates.

    Streams one tensor pair at a time, so it runs on checkpoints larger than RAM.
    """
    rows = []
    tally = SparsityTally()
    for pair in iter_tensor_pairs(dir_a, dir_b):
        parameters = pair.w0.numel()
        unchanged = unchanged_count(pair.w0, pair.w1, eta)
        rows.append(metric_row(pair.name, pair.info, SPARSITY, parameters, unchanged / parameters))
        tally.add(pair.info, unchanged, parameters)
    return frame(rows + tally.rows())


def as_cache(cache: StatCache | str | Path | None) -> StatCache | None:
    """Accept a StatCache, a cache folder, or None (no caching)."""
    return cache if cache is None or isinstance(cache, StatCache) else StatCache(cache)


def cached_spectrum(
    w_mn: torch.Tensor, k: int, cache: StatCache | None, device: str, digest: str | None = None
) -> Spectrum:
    """Float64 spectrum of one matrix, from the content-addressed cache when possible."""
    if cache is None:
        return spectrum(w_mn, k, device)
    digest = digest or tensor_digest(w_mn)
    stats = cache.get_or_compute([digest], "spectrum", {"k": k}, lambda: spectrum(w_mn, k, device).as_dict())
    return Spectrum.from_dict(stats)


def cached_base_masks(
    w0_mn: torch.Tensor, alpha: float, k: int, spec: Spectrum, cache: StatCache | None, digest: str
) -> BaseMasks:
    """W0's localization masks (principal mask packed, low-magnitude threshold and ties), cached per W0."""
    if cache is None:
        return base_masks(w0_mn, alpha, k, spec)
    stats = cache.get_or_compute(
        [digest], "base_masks", {"alpha": alpha, "k": k}, lambda: base_masks(w0_mn, alpha, k, spec).as_dict()
    )
    return BaseMasks.from_dict(stats)


def _spectral_values(w0_mn, w1_mn, k, alpha, eta, cache, device) -> tuple[dict[str, float], int]:
    """The spectral metrics of one matrix pair, and its number of changed entries (from the same pass)."""
    k_eff = min(k, *w0_mn.shape)
    digest0 = tensor_digest(w0_mn) if cache is not None else None
    s0 = cached_spectrum(w0_mn, k_eff, cache, device, digest0)
    s1 = cached_spectrum(w1_mn, k_eff, cache, device)
    values = {"spectral_shift": normalized_shift(s0.sigma_r, s1.sigma_r)}
    for side, a_k, b_k in (("left", s0.left_mk, s1.left_mk), ("right", s0.right_nk, s1.right_nk)):
        theta_k = angles_between(a_k, b_k)
        values[f"principal_angle_{side}_max"] = float(theta_k.max())
        values[f"principal_angle_{side}_mean"] = float(theta_k.mean())
    counts = overlap_counts(w0_mn, w1_mn, eta, cached_base_masks(w0_mn, alpha, k_eff, s0, cache, digest0))
    overlap = counts.fractions()
    values["mask_overlap_principal"] = overlap["principal"]
    values["mask_overlap_low_magnitude"] = overlap["low_magnitude"]
    return values, counts.changed


def compare_checkpoints(
    dir_a: str | Path,
    dir_b: str | Path,
    k: int = 16,
    alpha: float = DEFAULT_ALPHA,
    eta: float = 1e-3,
    cache: StatCache | str | Path | None = None,
    device: str = "cpu",
    spectral_kinds: tuple[str, ...] = ("matrix",),
    progress: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Every diagnostic of B relative to A, long format (same schema as sparsity_table).

    All tensors: bf16_sparsity, update_frobenius_norm, relative_update_norm (||dW||_F / ||W0||_F).
    Tensors of ``spectral_kinds`` (2-D layer matrices by default; embeddings and lm_head are
    costly and reported separately when asked for): spectral_shift (NSS),
    principal_angle_{left,right}_{max,mean} (degrees, top-k subspaces), and
    mask_overlap_{principal,low_magnitude} (random baseline = alpha). Aggregates: sparsity
    rows "module:<name>" and "all:<kind>" as in sparsity_table. Spectra of each tensor and
    W0's localization masks are cached by content, so the anchor's are computed once per study
    and a further checkpoint of the same base costs one spectrum per matrix. ``dir_a``/``dir_b`` are
    folders or checkpoint sources (see geometry.stream.FolderCheckpoint); ``progress(name)`` is
    called after each tensor.
    """
    cache = as_cache(cache)
    rows = []
    tally = SparsityTally()
    for pair in iter_tensor_pairs(dir_a, dir_b):
        parameters = pair.w0.numel()
        spectral = {}
        if pair.info.kind in spectral_kinds and pair.w0.dim() == 2:
            LOG.info("spectra of %s %s", pair.name, tuple(pair.w0.shape))
            spectral, changed = _spectral_values(pair.w0, pair.w1, k, alpha, eta, cache, device)
            unchanged = parameters - changed
        else:
            unchanged = unchanged_count(pair.w0, pair.w1, eta)
        tally.add(pair.info, unchanged, parameters)
        delta_norm, base_norm = update_norms(pair.w0, pair.w1)
        relative = delta_norm / base_norm if base_norm > 0 else float("nan")
        values = {
            SPARSITY: unchanged / parameters,
            "update_frobenius_norm": delta_norm,
            "relative_update_norm": relative,
            **spectral,
        }
        rows.extend(metric_row(pair.name, pair.info, metric, parameters, value) for metric, value in values.items())
        if progress is not None:
            progress(pair.name)
    return frame(rows + tally.rows())
