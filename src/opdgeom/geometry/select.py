"""Exact selection of the alpha fraction of largest or smallest entries of a huge tensor.

The localization masks take the top or bottom 5 % of a matrix with up to 50M entries (a
12288x4096 projection). torch.quantile refuses more than 16M entries, and kthvalue on the
whole float64 tensor took 0.9 s and a full copy per call. Here values arrive chunk by chunk
and two passes find the exact k-th value:

1. a histogram of the top 16 bits of each value (sign, exponent and the leading mantissa
   bits) locates the bucket holding the k-th value;
2. kthvalue runs on that bucket's entries only (a sliver of the tensor).

Keys are read from the values' own bytes (no float64 copy): 26 ms per 4M-entry chunk here.

A selection is stored as (threshold, ties): every entry strictly beyond the threshold plus
the first ``ties`` entries equal to it in flat (row-major) order, so a mask has exactly
``count`` entries, deterministically, even when bf16 magnitudes tie, and two scalars are
all a cache needs to rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from opdgeom.geometry.bits import FLOAT_DTYPES, nonfinite_halfwords, top_halfwords

BUCKETS = 1 << 16
HALF = BUCKETS // 2

Chunks = Callable[[], Iterable[torch.Tensor]]


@dataclass(frozen=True)
class Selection:
    """The ``count`` extreme entries: all strictly beyond ``threshold``, plus the first ``ties`` equal to it."""

    threshold: float
    ties: int
    largest: bool

    def as_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}_threshold": torch.tensor(self.threshold, dtype=torch.float64),
            f"{prefix}_ties": torch.tensor(self.ties, dtype=torch.int64),
            f"{prefix}_largest": torch.tensor(self.largest),
        }

    @classmethod
    def from_dict(cls, stats: dict[str, torch.Tensor], prefix: str) -> Selection:
        return cls(
            threshold=float(stats[f"{prefix}_threshold"]),
            ties=int(stats[f"{prefix}_ties"]),
            largest=bool(stats[f"{prefix}_largest"]),
        )


def _flat(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.dtype not in FLOAT_DTYPES:
        raise TypeError(f"floating-point values expected, got {chunk.dtype}")
    return chunk.detach().reshape(-1)


def _ordered(top: torch.Tensor) -> torch.Tensor:
    """Bucket ids in [0, 65536), monotone in the value, from signed high half-words.

    Read as a signed int16, the high half-word (sign, exponent, leading mantissa bits) orders
    non-negative floats; negative ones count down instead, so their low 15 bits are flipped.
    """
    top = top.to(torch.int32)
    return (top ^ ((top >> 15) & 0x7FFF)) + HALF


def _prepared(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(flat values, their high half-words, whether any is negative).

    -0.0 and +0.0 compare equal but have different high half-words, so signed data has its
    -0.0 folded into +0.0 first (the only case that pays for a copy). Non-negative data, all
    the masks of the study, skips the reordering: its half-words already are bucket ids - HALF.
    """
    flat = _flat(chunk)
    top = top_halfwords(flat)
    signed = bool((top < 0).any())
    if signed:
        flat = flat + 0.0
        top = top_halfwords(flat)
    return flat, top, signed


def select(chunks: Chunks, count: int, largest: bool) -> Selection:
    """Exact threshold and tie count of the ``count`` largest (or smallest) finite values.

    ``chunks`` is called twice and must yield the same flat sequence of values both times.
    """
    numel = 0
    hist = torch.zeros(BUCKETS, dtype=torch.int64)
    dtypes = set()
    for chunk in chunks():
        flat, top, signed = _prepared(chunk)
        if signed:
            hist += torch.bincount(_ordered(top), minlength=BUCKETS)
        else:
            hist[HALF:] += torch.bincount(top.to(torch.int32), minlength=HALF)
        numel += flat.numel()
        dtypes.add(flat.dtype)
    # NaN and Inf have their own buckets, so the histogram tells whether there were any.
    if any(int(hist[_ordered(nonfinite_halfwords(dtype))].sum()) for dtype in dtypes):
        raise ValueError("selection over non-finite values")
    if not 0 <= count <= numel:
        raise ValueError(f"count must be in 0..{numel}, got {count}")
    if count == 0:
        return Selection(threshold=float("inf") if largest else float("-inf"), ties=0, largest=largest)
    position = numel - count + 1 if largest else count  # 1-based ascending rank of the threshold
    cumulative = hist.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(position)))
    before = int(cumulative[bucket - 1]) if bucket > 0 else 0
    parts = []
    for flat, top, signed in map(_prepared, chunks()):
        in_bucket = _ordered(top) == bucket if signed else top == bucket - HALF
        parts.append(flat[in_bucket].to(torch.float64))
    candidates = torch.cat(parts)
    threshold = candidates.kthvalue(position - before).values
    if largest:
        strict = numel - int(cumulative[bucket]) + int(torch.count_nonzero(candidates > threshold))
    else:
        strict = before + int(torch.count_nonzero(candidates < threshold))
    return Selection(threshold=float(threshold), ties=count - strict, largest=largest)


def selection_masks(chunks: Iterable[torch.Tensor], selection: Selection) -> Iterator[torch.Tensor]:
    """Boolean masks, chunk by chunk, of the entries ``selection`` picks from the same sequence.

    The threshold is one of the values, so comparing in the values' own dtype is exact.
    """
    ties_left = selection.ties
    for chunk in chunks:
        flat = _flat(chunk)
        mask = flat > selection.threshold if selection.largest else flat < selection.threshold
        if ties_left > 0:
            tied = torch.nonzero(flat == selection.threshold).reshape(-1)[:ties_left]
            mask[tied] = True
            ties_left -= tied.numel()
        yield mask.reshape(chunk.shape)


def flat_chunks(values: torch.Tensor, chunk_numel: int) -> Chunks:
    """A re-iterable chunking of a tensor's flat values."""
    flat = values.detach().reshape(-1)
    return lambda: (flat[start : start + chunk_numel] for start in range(0, flat.numel(), chunk_numel))


def extreme_mask(values: torch.Tensor, count: int, largest: bool, chunk_numel: int = 1 << 22) -> torch.Tensor:
    """Boolean mask of exactly ``count`` largest (or smallest) entries, ties broken by flat index."""
    chunks = flat_chunks(values, chunk_numel)
    selection = select(chunks, count, largest)
    return torch.cat(list(selection_masks(chunks(), selection))).reshape(values.shape)
