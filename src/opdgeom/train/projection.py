"""Functional sufficiency: train inside a fixed low-rank input subspace of every weight matrix.

V_r (in x r) = the top-r right singular vectors of a reference run's cumulative update
dW = W_t - W_0 at ~20% of that run (computed by opdgeom.geometry.basis, read here from its file).
Mode "gradient" projects each gradient, g <- g V V^T, before the optimizer (AdamW's
per-coordinate scaling and weight decay can still move weights outside the subspace: that leak is
measured, not hidden). Mode "update" projects the cumulative update after every optimizer step,
W <- W_0 + (W - W_0) V V^T, so the weights never leave W_0 + span. Only the 2-D matrices inside
transformer layers are projected; embeddings, lm_head and 1-D weights train freely in both modes.

Both projections act on the input (column) side, so they are row-local: under FSDP2, which
shards every matrix by rows, each rank projects the rows it holds and no weight moves between ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdgeom.train.distributed import SINGLE, World, global_sum

MODES = ("gradient", "update")


def _local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a matrix this rank holds: the local shard of an FSDP2 DTensor, else the matrix."""
    if not hasattr(tensor, "to_local"):
        return tensor
    if any(not (placement.is_shard(0) or placement.is_replicate()) for placement in tensor.placements):
        raise ValueError(f"the projection needs matrices sharded by rows, got placements {tensor.placements}")
    return tensor.to_local()


class SubspaceProjection:
    def __init__(self, model, bases_nk: dict[str, torch.Tensor], mode: str, world: World = SINGLE):
        if mode not in MODES:
            raise ValueError(f"projection mode must be one of {MODES}, got {mode!r}")
        params = dict(model.named_parameters())
        missing = sorted(set(bases_nk) - set(params))
        if missing:
            raise ValueError(f"projection basis names tensors the model does not have: {missing[:3]}")
        self.mode = mode
        self.world = world
        self.params = {name: params[name] for name in bases_nk}
        # The rank-k bases themselves (n x k), never the n x n projectors V V^T: g V V^T is applied
        # as (g V) V^T, k/n of the memory and of the flops.
        self.bases_nk = {
            name: v.to(device=_local_rows(params[name]).device, dtype=params[name].dtype)
            for name, v in bases_nk.items()
        }
        self.w0 = {name: _local_rows(p).detach().clone() for name, p in self.params.items()}

    @classmethod
    def from_file(cls, model, bases_file: Path, mode: str, world: World = SINGLE):
        """Bases written by ``opdgeom basis`` (opdgeom.geometry.basis) from the reference run."""
        from safetensors.torch import load_file

        return cls(model, load_file(bases_file), mode, world)

    @torch.no_grad()
    def after_backward(self, model) -> None:
        if self.mode == "gradient":
            for name, param in self.params.items():
                if param.grad is not None:
                    grad, v_nk = _local_rows(param.grad), self.bases_nk[name]
                    grad.copy_((grad @ v_nk) @ v_nk.T)

    @torch.no_grad()
    def after_update(self, model) -> None:
        if self.mode == "update":
            for name, param in self.params.items():
                w0, w, v_nk = self.w0[name], _local_rows(param), self.bases_nk[name]
                w.copy_(w0 + ((w - w0) @ v_nk) @ v_nk.T)

    @torch.no_grad()
    def energy_outside(self) -> dict[str, float]:
        """Fraction of each matrix's cumulative update energy outside the subspace, and in total.

        Under torchrun every rank must call it (the energies are summed over ranks' rows).
        """
        energies = []
        for name, param in self.params.items():
            dw = (_local_rows(param) - self.w0[name]).double()
            v_nk = self.bases_nk[name].double()
            outside = dw - (dw @ v_nk) @ v_nk.T
            energies.append(torch.stack([outside.square().sum(), dw.square().sum()]))
        summed = global_sum(torch.stack(energies), self.world).cpu().tolist() if energies else []
        out = {name: e_out / e_all if e_all > 0 else 0.0 for name, (e_out, e_all) in zip(self.params, summed)}
        total_out, total = sum(e[0] for e in summed), sum(e[1] for e in summed)
        out["total"] = total_out / total if total > 0 else 0.0
        return out
