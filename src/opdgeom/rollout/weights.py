"""The policy's weights as the engines take them: whole tensors in the engine's dtype, gathered from
FSDP shards bucket by bucket.

Under FSDP2 every parameter is a DTensor holding this rank's dim-0 rows; ``full_tensor()`` all-gathers
one of them (a collective: every rank walks the parameters in the same order, which
``named_parameters`` guarantees for replicas of one model). Each gathered tensor is cast to the
engine's dtype at once, so at most one fp32 parameter and one bucket of engine-dtype tensors exist
beyond the shards: never a whole fp32 copy, nor a whole bf16 one when the engine loads bucket by
bucket. Plain (unsharded) models pass through unchanged apart from the cast. No vLLM import here:
the main environment's tests use this module too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from opdgeom.dtensor import full_tensor

DEFAULT_BUCKET_BYTES = 1 << 28  # 256 MiB: ~2 decoder layers of Qwen3-8B in bf16


@torch.no_grad()
def weight_buckets(
    model, dtype: torch.dtype | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Lists of (HF parameter name, whole tensor in ``dtype``), each list about ``bucket_bytes``.

    Names are the transformers model's own (FSDP2 adds no prefix), i.e. checkpoint names, which
    vLLM's loaders map onto their fused layers. Tied weights appear once (under the embedding).
    A bucket is yielded as soon as it is full; the caller loads it before the next is gathered.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, param in model.named_parameters():
        full = full_tensor(param.detach())
        tensor = full.to(dtype) if dtype is not None and full.dtype != dtype else full
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        del full
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def iter_weights(model, dtype: torch.dtype | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """``weight_buckets`` flattened to the (name, tensor) stream vLLM's loaders read, still gathered
    lazily one bucket at a time."""
    for bucket in weight_buckets(model, dtype, bucket_bytes):
        yield from bucket
