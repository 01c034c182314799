"""Element-wise update diagnostics: bf16-aware sparsity, update-mask overlap, norms.

Pure functions on tensors, no I/O. Every comparison is done in float64 (or in an
exact shortcut that provably gives the same answer), because the quantities measured
are tiny: a float32 product ``eta * max(|w0|, |w1|)`` can round across an exact tie.
Work is chunked over the flattened tensors so temporaries stay small even for a
12288x4096 matrix (50M entries).
"""

from __future__ import annotations

import torch

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
