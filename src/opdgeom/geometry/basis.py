"""The training subspace of the functional-sufficiency control, as a geometry product.

V_r (in x r) = the top-r right singular vectors (float64 SVD) of a reference run's cumulative update
dW = W_t - W_0 for every 2-D matrix inside the transformer layers, streamed tensor by tensor and
written as one safetensors file, which the projected run's training job reads.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from opdgeom.geometry.spectral import top_right_singular_vectors
from opdgeom.geometry.stream import iter_tensor_pairs
from opdgeom.io import atomic_path


def update_bases(init, checkpoint, rank: int) -> dict:
    """{matrix name: V (n x min(rank, n, m), float32, orthonormal columns)} of ``checkpoint - init``."""
    bases = {}
    for pair in iter_tensor_pairs(init, checkpoint):
        if pair.info.kind == "matrix":
            dw_mn = pair.w1.double() - pair.w0.double()
            bases[pair.name] = top_right_singular_vectors(dw_mn, min(rank, min(dw_mn.shape))).float().contiguous()
    if not bases:
        raise ValueError(f"{checkpoint}: no layer matrices to take a subspace from")
    return bases


def write_bases(init, checkpoint, rank: int, out: str | Path) -> Path:
    bases = update_bases(init, checkpoint, rank)
    with atomic_path(out) as tmp:
        save_file(bases, tmp, metadata={"init": str(init), "checkpoint": str(checkpoint), "rank": str(rank)})
    return Path(out)
