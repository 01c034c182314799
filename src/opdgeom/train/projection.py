"""Functional sufficiency: train inside a fixed low-rank input subspace of every weight matrix.

V_r (in x r) = the top-r right singular vectors of a reference run's cumulative update
dW = W_t - W_0 at ~20% of that run. Mode "gradient" projects each gradient, g <- g V V^T, before
the optimizer (AdamW's per-coordinate scaling and weight decay can still move weights outside the
subspace: that leak is measured, not hidden). Mode "update" projects the cumulative update after
every optimizer step, W <- W_0 + (W - W_0) V V^T, so the weights never leave W_0 + span.
Only the 2-D matrices inside transformer layers are projected; embeddings, lm_head and 1-D weights
train freely in both modes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdgeom.geometry.spectral import top_right_singular_vectors
from opdgeom.geometry.stream import iter_tensor_pairs

MODES = ("gradient", "update")


class SubspaceProjection:
    def __init__(self, model, bases_nk: dict[str, torch.Tensor], mode: str):
        if mode not in MODES:
            raise ValueError(f"projection mode must be one of {MODES}, got {mode!r}")
        params = dict(model.named_parameters())
        missing = sorted(set(bases_nk) - set(params))
        if missing:
            raise ValueError(f"projection basis names tensors the model does not have: {missing[:3]}")
        self.mode = mode
        self.params = {name: params[name] for name in bases_nk}
        self.projectors_nn = {name: (v @ v.T).to(params[name].dtype) for name, v in bases_nk.items()}
        self.w0 = {name: p.detach().clone() for name, p in self.params.items()}

    @classmethod
    def from_reference(cls, model, reference_init: Path, reference_checkpoint: Path, rank: int, mode: str):
        """Bases from the reference run's update between two checkpoints (streamed tensor by tensor)."""
        bases = {}
        for pair in iter_tensor_pairs(reference_init, reference_checkpoint):
            if pair.info.kind == "matrix":
                dw_mn = pair.w1.double() - pair.w0.double()
                bases[pair.name] = top_right_singular_vectors(dw_mn, min(rank, min(dw_mn.shape))).float()
        return cls(model, bases, mode)

    @torch.no_grad()
    def after_backward(self, model) -> None:
        if self.mode == "gradient":
            for name, param in self.params.items():
                if param.grad is not None:
                    param.grad.copy_(param.grad @ self.projectors_nn[name])

    @torch.no_grad()
    def after_update(self, model) -> None:
        if self.mode == "update":
            for name, param in self.params.items():
                w0 = self.w0[name]
                param.copy_(w0 + (param - w0) @ self.projectors_nn[name])

    @torch.no_grad()
    def energy_outside(self) -> dict[str, float]:
        """Fraction of each matrix's cumulative update energy outside the subspace, and in total."""
        out, total_out, total = {}, 0.0, 0.0
        for name, param in self.params.items():
            dw = (param - self.w0[name]).double()
            outside = dw - dw @ self.projectors_nn[name].double()
            e_out, e_all = float(outside.square().sum()), float(dw.square().sum())
            out[name] = e_out / e_all if e_all > 0 else 0.0
            total_out, total = total_out + e_out, total + e_all
        out["total"] = total_out / total if total > 0 else 0.0
        return out
