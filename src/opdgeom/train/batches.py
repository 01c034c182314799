"""Which examples a step trains on (a pure function of (seed, step), so a resumed run replays them),
and the token batch a step trains on, split into micro-batches by a token budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from opdgeom.logprobs import token_logprobs
from opdgeom.train.distributed import World, global_max


def epoch_batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch at ``step``: a fresh permutation per epoch, a pure function of (seed, step).

    Deriving the data position from the step is what makes a resumed run see the same batches.
    """
    indices = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n_items)
        indices.append(_epoch_permutation(n_items, seed, epoch)[offset])
    return indices


@lru_cache(maxsize=4)
def _epoch_permutation(n_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_items, generator=gen).tolist())


@dataclass
class TokenBatch:
    """One step's rows on this rank: right-padded prompt+completion ids, the positions that train,
    and whatever per-row tensors a method's loss reads (``*_BT``: one value per target position;
    ``*_B``: one per row).

    ``normalizer`` is the loss denominator of the whole step (the global kept-token count / W), fixed
    before the step is split into micro-batches, so the micro-batch losses add up to the step's.
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    target_mask_BT: torch.Tensor  # (B, T-1): position t trains when token t+1 is a kept completion token
    normalizer: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.input_ids_BT.shape[0]

    def select(self, rows: list[int]) -> TokenBatch:
        """Some rows, cut to their own longest length (right padding beyond it is never attended)."""
        width = max(1, int(self.attention_mask_BT[rows].sum(dim=1).max()))
        index = torch.tensor(rows, device=self.input_ids_BT.device)

        def cut(name: str, tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.index_select(0, index)
            return tensor[:, : width - 1] if name.endswith("_BT") else tensor

        return TokenBatch(
            self.input_ids_BT.index_select(0, index)[:, :width],
            self.attention_mask_BT.index_select(0, index)[:, :width],
            cut("target_mask_BT", self.target_mask_BT),
            self.normalizer,
            {name: cut(name, tensor) for name, tensor in self.extra.items()},
        )

    def split(self, max_tokens: int | None, n_parts: int | None = None) -> list[list[int]]:
        """Consecutive row groups whose padded size (rows x longest row) stays within ``max_tokens``
        (a longer row gets a group of its own); with ``n_parts``, at least that many groups (ranks of
        one FSDP job must run the same number of forward/backward passes)."""
        lengths = self.attention_mask_BT.sum(dim=1).tolist()
        groups: list[list[int]] = []
        for row, length in enumerate(lengths):
            if groups and max_tokens is not None:
                widest = max(length, *(lengths[r] for r in groups[-1]))
                if widest * (len(groups[-1]) + 1) <= max_tokens:
                    groups[-1].append(row)
                    continue
            if groups and max_tokens is None:
                groups[-1].append(row)
                continue
            groups.append([row])
        while n_parts is not None and len(groups) < n_parts:
            largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
            if len(groups[largest]) < 2:
                raise ValueError(f"cannot split {self.rows} rows into {n_parts} micro-batches")
            half = len(groups[largest]) // 2
            groups[largest : largest + 1] = [groups[largest][:half], groups[largest][half:]]
        return groups

    def micro_batches(self, max_tokens: int | None, world: World) -> list[list[int]]:
        """:meth:`split` into as many groups as the rank of ``world`` that needs the most.

        Every forward (and backward) pass through an FSDP-sharded model all-gathers its layers, so a
        rank that ran fewer passes would leave the others waiting in a collective until the timeout.
        Every multi-pass loop over a step's rows (the loss, and each scoring pass) splits this way."""
        groups = self.split(max_tokens)
        return self.split(max_tokens, n_parts=global_max(len(groups), world))


@torch.no_grad()
def score(model, batch: TokenBatch, max_tokens: int | None, world: World) -> torch.Tensor:
    """log pi(y_t) of the completion positions of ``batch`` under ``model`` (0 elsewhere: nothing reads
    a prompt's scores), micro-batch by micro-batch: (B, T-1).

    ``world``: the ranks that hold ``model`` (sharded); each runs the same number of passes."""
    out_BT = torch.zeros(batch.target_mask_BT.shape, dtype=torch.float32, device=batch.input_ids_BT.device)
    for rows in batch.micro_batches(max_tokens, world):
        micro = batch.select(rows)
        positions_BT = micro.extra.get("completion_mask_BT", micro.target_mask_BT).bool()
        logp_BT = token_logprobs(model, micro.input_ids_BT, micro.attention_mask_BT, positions_BT=positions_BT)
        out_BT[rows, : logp_BT.shape[1]] = logp_BT.float()
    return out_BT
