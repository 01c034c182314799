"""Element-wise update diagnostics: bf16-aware sparsity, update-mask overlap, norms.

Pure functions on tensors, no I/O. Every comparison is done in float64 (or in an
exact shortcut that provably gives the same answer), because the quantities measured
are tiny: a float32 product ``eta * max(|w0|, |w1|)`` can round across an exact tie.
Work is chunked over the flattened tensors so temporaries stay small even for a
12288x4096 matrix (50M entries).
"""

from __future__ import annotations

import torch

from opdgeom.geometry.spectral import Spectrum, low_rank_reconstruction, spectrum

# Elements per chunk: 4M float64 temporaries = 32 MB each.
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
    a_n = w0.detach().reshape(-1)
    b_n = w1.detach().reshape(-1)
    count = 0
    for start in range(0, a_n.numel(), CHUNK_NUMEL):
        stop = start + CHUNK_NUMEL
        count += int(torch.count_nonzero(_unchanged_mask(a_n[start:stop], b_n[start:stop], eta)))
    return count


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
    a_n = w0.detach().reshape(-1)
    b_n = w1.detach().reshape(-1)
    mask_n = torch.empty(a_n.numel(), dtype=torch.bool)
    for start in range(0, a_n.numel(), CHUNK_NUMEL):
        stop = start + CHUNK_NUMEL
        torch.logical_not(_unchanged_mask(a_n[start:stop], b_n[start:stop], eta), out=mask_n[start:stop])
    return mask_n.reshape(w0.shape)


def extreme_mask(values: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Boolean mask of exactly ``count`` largest (or smallest) entries, ties broken by flat index.

    torch.quantile refuses tensors over 16M entries (gate/up projections have 50M), and
    bf16 magnitudes tie often, so the threshold comes from kthvalue and the entries equal
    to it are taken in index order: the mask has exactly ``count`` entries, deterministically.
    """
    flat_n = values.reshape(-1)
    numel = flat_n.numel()
    if not 0 <= count <= numel:
        raise ValueError(f"count must be in 0..{numel}, got {count}")
    mask_n = torch.zeros(numel, dtype=torch.bool)
    if count == 0:
        return mask_n.reshape(values.shape)
    kth = numel - count + 1 if largest else count
    threshold = flat_n.kthvalue(kth).values
    strict_n = flat_n > threshold if largest else flat_n < threshold
    mask_n |= strict_n
    need = count - int(torch.count_nonzero(strict_n))
    ties_t = torch.nonzero(flat_n == threshold).reshape(-1)[:need]
    mask_n[ties_t] = True
    return mask_n.reshape(values.shape)


def mask_overlap(
    w0_mn: torch.Tensor,
    w1_mn: torch.Tensor,
    alpha: float,
    k: int,
    eta: float = 1e-3,
    spectrum0: Spectrum | None = None,
) -> dict[str, float]:
    """Where does the visible update land? Overlap |M_* & M| / |M| of the update mask M with

    - "principal": the top-alpha entries of |rank-k SVD reconstruction of W0| (the weights
      that carry W0's principal directions), and
    - "low_magnitude": the bottom-alpha entries of |W0|.

    A mask independent of the update overlaps alpha in expectation (the random baseline).
    NaN when nothing changed. ``spectrum0`` reuses a cached float64 spectrum of W0.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    changed_mn = update_mask(w0_mn, w1_mn, eta)
    changed = int(torch.count_nonzero(changed_mn))
    if changed == 0:
        return {"principal": float("nan"), "low_magnitude": float("nan")}
    count = max(1, round(alpha * w0_mn.numel()))
    spec = spectrum0 if spectrum0 is not None else spectrum(w0_mn, k)
    recon_mn = low_rank_reconstruction(spec, k).abs_()
    principal_mn = extreme_mask(recon_mn, count, largest=True)
    del recon_mn
    magnitude_mn = w0_mn.detach().abs().to(torch.promote_types(w0_mn.dtype, torch.float32))
    low_mn = extreme_mask(magnitude_mn, count, largest=False)
    return {
        "principal": int(torch.count_nonzero(principal_mn & changed_mn)) / changed,
        "low_magnitude": int(torch.count_nonzero(low_mn & changed_mn)) / changed,
    }


def update_norms(w0: torch.Tensor, w1: torch.Tensor) -> tuple[float, float]:
    """(||W1 - W0||_F, ||W0||_F), differences taken in float64 chunk by chunk."""
    _check_pair(w0, w1, 0.0)
    a_n = w0.detach().reshape(-1)
    b_n = w1.detach().reshape(-1)
    delta_sq = 0.0
    base_sq = 0.0
    for start in range(0, a_n.numel(), CHUNK_NUMEL):
        a64 = a_n[start : start + CHUNK_NUMEL].to(torch.float64)
        b64 = b_n[start : start + CHUNK_NUMEL].to(torch.float64)
        delta_sq += float(torch.sub(b64, a64).square_().sum())
        base_sq += float(a64.square().sum())
    return delta_sq**0.5, base_sq**0.5
