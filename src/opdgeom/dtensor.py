"""FSDP2-sharded values as plain tensors, for the layers above that must see whole ones.

Under FSDP2 a parameter (or a norm reduced over parameters) is a DTensor holding this rank's part;
``full_tensor()`` all-gathers it, a collective that every rank must call in the same order. It lives
here, below both train/ and rollout/, because both gather: the trainer for gradient norms and
checkpoint export, the rollout engines for weight sync.
"""

from __future__ import annotations

import torch


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor as a plain tensor (gathered from every rank); a plain tensor unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
