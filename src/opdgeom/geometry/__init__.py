"""Parameter-space diagnostics: how an update moves each weight tensor.

``metrics`` holds pure functions on tensors, ``stream`` reads checkpoints one tensor at
a time, ``compare`` turns a checkpoint pair into a long-format table.
"""

from opdgeom.geometry.compare import sparsity_table
from opdgeom.geometry.metrics import bf16_sparsity, unchanged_count, update_mask
from opdgeom.geometry.stream import CheckpointError, TensorInfo, classify, iter_tensor_pairs

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "bf16_sparsity",
    "classify",
    "iter_tensor_pairs",
    "sparsity_table",
    "unchanged_count",
    "update_mask",
]
