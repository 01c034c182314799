"""Compare two checkpoints tensor by tensor into a long-format polars table.

One row per (tensor, metric); aggregates over module types and tensor kinds are extra
rows whose ``tensor`` is "module:<name>" or "all:<kind>". Only sparsity aggregates
exactly (parameter-weighted unchanged counts / total); the spectral metrics are
reported per matrix and aggregated by the figures, which know what summary they need.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl

from opdgeom.geometry.metrics import unchanged_count
from opdgeom.geometry.stream import TensorInfo, iter_tensor_pairs

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


def _row(tensor: str, info: TensorInfo, metric: str, parameters: int, value: float) -> dict:
    return {
        "tensor": tensor,
        "kind": info.kind,
        "layer": info.layer,
        "module": info.module,
        "metric": metric,
        "parameters": parameters,
        "value": float(value),
    }


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
            rows.append(_row(tensor, info, SPARSITY, total, unchanged / total))
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
        rows.append(_row(pair.name, pair.info, SPARSITY, parameters, unchanged / parameters))
        tally.add(pair.info, unchanged, parameters)
    return frame(rows + tally.rows())
