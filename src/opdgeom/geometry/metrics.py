"""Element-wise update diagnostics: bf16-aware sparsity, update-mask overlap, norms.

Pure functions on tensors, no I/O. Every comparison is done in float64 (or in an
exact shortcut that provably gives the same answer), because the quantities measured
are tiny: a float32 product ``eta * max(|w0|, |w1|)`` can round across an exact tie.
Work is chunked over the flattened tensors so temporaries stay small even for a
12288x4096 matrix (50M entries).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from opdgeom.geometry.select import Selection, flat_chunks, select, selection_masks
from opdgeom.geometry.spectral import Spectrum, low_rank_reconstruction, spectrum

# Elements per chunk: 4M float64 temporaries = 32 MB each (a multiple of 8: packed masks split on bytes).
CHUNK_NUMEL = 1 << 22

# Two distinct bf16 values differ by at least 2^-8 of the larger magnitude (the minimum,
# exactly 2^-8, is at a binade edge: 2^(e+1) vs its predecessor; subnormals differ by
# >= 2^-7), so for eta < 2^-8 "unchanged" is exactly bf16 equality (which also treats
# +0 == -0) and the float64 formula can be skipped.
BF16_EXACT_ETA = 2.0**-8


def _check_pair(w0: torch.Tensor, w1: torch.Tensor, eta: float) -> None:
    if w0.shape != w1.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    if not (w0.is_floating_point() and w1.is_floating_point()):
        raise TypeError(f"floating-point tensors expected, got {w0.dtype} and {w1.dtype}")
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _unchanged_mask_f64(a: torch.Tensor, b: torch.Tensor, eta: float) -> torch.Tensor:
    """The rule itself on one flat chunk, in float64 (bf16/fp16/fp32 convert exactly)."""
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    tol = torch.maximum(a64.abs(), b64.abs()).mul_(eta)
    return torch.sub(a64, b64).abs_().le_(tol)  # out of place: a64 may alias a float64 input


def _chunk_pairs(w0: torch.Tensor, w1: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(flat start, w0 chunk, w1 chunk) over both tensors' flattened entries, CHUNK_NUMEL at a time."""
    a_n, b_n = w0.detach().reshape(-1), w1.detach().reshape(-1)
    for start in range(0, a_n.numel(), CHUNK_NUMEL):
        yield start, a_n[start : start + CHUNK_NUMEL], b_n[start : start + CHUNK_NUMEL]


def _unchanged_mask(a: torch.Tensor, b: torch.Tensor, eta: float) -> torch.Tensor:
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and eta < BF16_EXACT_ETA:
        return a == b
    return _unchanged_mask_f64(a, b, eta)


def unchanged_count(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> int:
    """Number of entries with |w1 - w0| <= eta * max(|w0|, |w1|).

    Returned as an integer so callers can aggregate exactly over many tensors
    (parameter-weighted sparsity of a module type or of the whole model).
    """
    _check_pair(w0, w1, eta)
    return sum(int(torch.count_nonzero(_unchanged_mask(a_c, b_c, eta))) for _, a_c, b_c in _chunk_pairs(w0, w1))


def bf16_sparsity(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> float:
    """Fraction of entries the update left unchanged at bf16 resolution (density = 1 - this).

    With eta = 1e-3 an entry counts as changed exactly when its bf16 value changed
    (one bf16 step is at least 2^-8 of |x|), so the metric ignores sub-resolution noise
    of fp32 master weights while still working on fp32 checkpoints.
    """
    numel = w0.numel()
    if numel == 0:
        raise ValueError("empty tensors have no sparsity")
    return unchanged_count(w0, w1, eta) / numel


def update_mask(w0: torch.Tensor, w1: torch.Tensor, eta: float = 1e-3) -> torch.Tensor:
    """Boolean mask of entries the update changed visibly (the complement of unchanged)."""
    _check_pair(w0, w1, eta)
    mask_n = torch.empty(w0.numel(), dtype=torch.bool)
    for start, a_c, b_c in _chunk_pairs(w0, w1):
        torch.logical_not(_unchanged_mask(a_c, b_c, eta), out=mask_n[start : start + a_c.numel()])
    return mask_n.reshape(w0.shape)


@dataclass(frozen=True)
class BaseMasks:
    """W0's two localization masks, in the form a cache keeps per W0 (W0 alone defines them).

    principal_bits: the principal mask packed 8 entries per byte (np.packbits order), since
    rebuilding it needs the rank-k reconstruction; low_magnitude: a selection, since |W0|
    rebuilds that mask exactly with one comparison.
    """

    principal_bits: torch.Tensor
    low_magnitude: Selection

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"principal_bits": self.principal_bits, **self.low_magnitude.as_dict("low_magnitude")}

    @classmethod
    def from_dict(cls, stats: dict[str, torch.Tensor]) -> BaseMasks:
        return cls(stats["principal_bits"], Selection.from_dict(stats, "low_magnitude"))

    def principal(self, start: int, stop: int) -> torch.Tensor:
        """The principal mask's flat entries start..stop-1 (start a multiple of 8)."""
        packed = self.principal_bits[start // 8 : (stop + 7) // 8].numpy()
        return torch.from_numpy(np.unpackbits(packed, count=stop - start).view(np.bool_))


def _magnitude_chunks(w0_mn: torch.Tensor) -> Iterator[torch.Tensor]:
    return (chunk.abs() for chunk in flat_chunks(w0_mn, CHUNK_NUMEL)())


def base_masks(w0_mn: torch.Tensor, alpha: float, k: int, spectrum0: Spectrum | None = None) -> BaseMasks:
    """The top-alpha entries of |rank-k reconstruction of W0| and the bottom-alpha entries of |W0|."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    count = max(1, round(alpha * w0_mn.numel()))
    spec = spectrum0 if spectrum0 is not None else spectrum(w0_mn, k)
    if k > spec.left_mk.shape[1]:
        raise ValueError(f"k={k} exceeds the {spec.left_mk.shape[1]} singular vectors of the given spectrum")
    recon_chunks = flat_chunks(low_rank_reconstruction(spec, k), CHUNK_NUMEL)
    principal = select(recon_chunks, count, largest=True)
    principal_n = torch.cat(list(selection_masks(recon_chunks(), principal)))
    return BaseMasks(
        principal_bits=torch.from_numpy(np.packbits(principal_n.numpy())),
        low_magnitude=select(lambda: _magnitude_chunks(w0_mn), count, largest=False),
    )


@dataclass(frozen=True)
class OverlapCounts:
    """Entries of the update mask M (``changed``) and of M inside W0's two localization masks."""

    changed: int
    principal: int
    low_magnitude: int

    def fractions(self) -> dict[str, float]:
        if self.changed == 0:
            return {"principal": float("nan"), "low_magnitude": float("nan")}
        return {"principal": self.principal / self.changed, "low_magnitude": self.low_magnitude / self.changed}


def overlap_counts(w0_mn: torch.Tensor, w1_mn: torch.Tensor, eta: float, masks0: BaseMasks) -> OverlapCounts:
    """One chunked pass over the pair: |M|, |M_principal & M| and |M_low & M| given W0's masks.

    ``changed`` is numel minus unchanged_count, so a caller that wants both sparsity and the
    overlaps makes one pass, not two.
    """
    _check_pair(w0_mn, w1_mn, eta)
    changed = hits_principal = hits_low = 0
    low_chunks = selection_masks(_magnitude_chunks(w0_mn), masks0.low_magnitude)
    for (start, a_c, b_c), low_b in zip(_chunk_pairs(w0_mn, w1_mn), low_chunks):
        changed_b = torch.logical_not(_unchanged_mask(a_c, b_c, eta))
        changed += int(torch.count_nonzero(changed_b))
        hits_principal += int(torch.count_nonzero(masks0.principal(start, start + a_c.numel()) & changed_b))
        hits_low += int(torch.count_nonzero(low_b & changed_b))
    return OverlapCounts(changed, hits_principal, hits_low)


def mask_overlap(
    w0_mn: torch.Tensor,
    w1_mn: torch.Tensor,
    alpha: float,
    k: int,
    eta: float = 1e-3,
    spectrum0: Spectrum | None = None,
    masks0: BaseMasks | None = None,
) -> dict[str, float]:
    """Where does the visible update land? Overlap |M_* & M| / |M| of the update mask M with

    - "principal": the top-alpha entries of |rank-k SVD reconstruction of W0| (the weights
      that carry W0's principal directions), and
    - "low_magnitude": the bottom-alpha entries of |W0|,

    each exactly round(alpha * numel) entries, ties taken in flat order. A mask independent of
    the update overlaps alpha in expectation (the random baseline). NaN when nothing changed.
    ``spectrum0`` / ``masks0`` reuse W0's cached spectrum and masks; then one chunked pass
    over the pair is all that is left to do.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    _check_pair(w0_mn, w1_mn, eta)
    if masks0 is None and unchanged_count(w0_mn, w1_mn, eta) == w0_mn.numel():
        return {"principal": float("nan"), "low_magnitude": float("nan")}  # no spectrum for nothing
    masks = masks0 if masks0 is not None else base_masks(w0_mn, alpha, k, spectrum0)
    return overlap_counts(w0_mn, w1_mn, eta, masks).fractions()


def update_norms(w0: torch.Tensor, w1: torch.Tensor) -> tuple[float, float]:
    """(||W1 - W0||_F, ||W0||_F), chunk by chunk, chunk totals summed in float64.

    Inputs of 32 bits or fewer are differenced in float32 (bf16/fp16 convert exactly, and a
    float32 difference is correctly rounded, 6e-8 relative) and squared and summed by
    torch's cascade summation: 3e-8 relative to float64 on a 50M-entry bf16 pair, at a
    fifth of the float64 cost. float64 inputs, and any chunk whose squares overflow
    float32, are done in float64.
    """
    _check_pair(w0, w1, 0.0)
    work = torch.float64 if torch.float64 in (w0.dtype, w1.dtype) else torch.float32
    delta_sq = 0.0
    base_sq = 0.0
    for _, a_c, b_c in _chunk_pairs(w0, w1):
        delta, base = _squared_norms(a_c, b_c, work)
        if not (math.isfinite(delta) and math.isfinite(base)):
            delta, base = _squared_norms(a_c, b_c, torch.float64)
        delta_sq += delta
        base_sq += base
    return delta_sq**0.5, base_sq**0.5


def _squared_norms(a_c: torch.Tensor, b_c: torch.Tensor, work: torch.dtype) -> tuple[float, float]:
    a_w = a_c.to(work, copy=True)
    delta_w = b_c.to(work, copy=True).sub_(a_w)
    return float(delta_w.mul_(delta_w).sum()), float(a_w.mul_(a_w).sum())
