"""Parameter-space diagnostics: how an update moves each weight tensor.

Pure functions on tensors live in ``metrics`` (element-wise), ``spectral`` (spectra and
subspaces, float64) and ``tail`` (power-law tail index); ``stream`` reads checkpoints one
tensor at a time, ``cache`` stores statistics by content, and ``compare`` / ``trajectory``
turn checkpoints into long-format polars tables.
"""

from opdgeom.geometry.cache import StatCache, tensor_digest
from opdgeom.geometry.compare import compare_checkpoints, sparsity_table
from opdgeom.geometry.metrics import bf16_sparsity, mask_overlap, unchanged_count, update_mask, update_norms
from opdgeom.geometry.spectral import (
    Spectrum,
    angles_between,
    frobenius_norm,
    operator_norm,
    principal_angles,
    singular_values,
    spectral_shift,
    spectrum,
    stable_rank,
    subspace_similarity,
    top_right_singular_vectors,
)
from opdgeom.geometry.stream import CheckpointError, TensorInfo, classify, iter_tensor_pairs
from opdgeom.geometry.tail import tail_index
from opdgeom.geometry.trajectory import trajectory_table

__all__ = [
    "CheckpointError",
    "Spectrum",
    "StatCache",
    "TensorInfo",
    "angles_between",
    "bf16_sparsity",
    "classify",
    "compare_checkpoints",
    "frobenius_norm",
    "iter_tensor_pairs",
    "mask_overlap",
    "operator_norm",
    "principal_angles",
    "singular_values",
    "sparsity_table",
    "spectral_shift",
    "spectrum",
    "stable_rank",
    "subspace_similarity",
    "tail_index",
    "tensor_digest",
    "top_right_singular_vectors",
    "trajectory_table",
    "unchanged_count",
    "update_mask",
    "update_norms",
]
