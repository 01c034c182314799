"""Which device this process computes on (training, evaluation and rollouts share the choice)."""

from __future__ import annotations

import torch


def local_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device
