"""The update channel's geometry while a run trains: the trajectory metrics of dW = W_t - W_0 from the
weights in memory, every N steps, without gathering any matrix (under FSDP2 each rank holds dim-0 rows).

Per layer matrix (kind "matrix", as ``geometry.stream.classify`` names them):

- ``relative_update_norm``: ||dW||_F / ||W_0||_F;
- ``bf16_visible_fraction``: the share of entries whose bf16 value moved, 1 - ``metrics.bf16_sparsity``
  (|w_t - w_0| > eta max(|w_0|, |w_t|), eta = 1e-3);
- ``stable_rank``: ||dW||_F^2 / sigma_1^2;
- ``subspace_similarity_to_reference``: Sim_K(V_K(t), V_K(ref)) = ||V_K(t)^T V_K(ref)||_F^2 / K of the top-K
  right singular subspaces, ref = the saved checkpoint nearest ``reference_fraction`` of the run (the
  projection runs' rule), NaN before it.

W_t is rounded to bf16 first, as every exported checkpoint is (``checkpoint_dtype``; None for a trainer
that saves fp32): at a checkpoint step these are the exact engine's numbers for that checkpoint
(``geometry.trajectory``, float64 SVD), up to the iterative top-K method's error. Sums over a matrix's
rows (norms, counts, Gram products) are completed by ``reduce``, a sum over ranks (the identity on one
process), so every rank ends with the same replicated values.

Top-K: block subspace iteration on the Gram matrix dW^T dW, whose product with an n x b block is a sum
over row shards (one all-reduce of n x b per iteration), started from the previous observation's basis
(the channel moves slowly, so a few iterations converge) plus seeded random columns identical on every
rank, then Rayleigh-Ritz. b = 2K: convergence goes as (sigma_{2K+1} / sigma_K)^(2 iters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opdgeom.geometry.metrics import unchanged_count
from opdgeom.geometry.spectral import subspace_similarity
from opdgeom.geometry.stream import classify

Reduce = Callable[[torch.Tensor], torch.Tensor]
METRICS = ("relative_update_norm", "bf16_visible_fraction", "stable_rank", "subspace_similarity_to_reference")
SUMMARY = "all:matrix"  # the parameter-weighted mean over layer matrices


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value


@dataclass(frozen=True)
class MonitorSettings:
    every: int
    k: int = 16
    reference_fraction: float = 0.2
    iters: int = 8  # Sim_K within 5e-5 of float64 SVD on bf16-noisy updates (tests/test_live_geometry.py)
    eta: float = 1e-3
    sim_below: float = 0.5  # alert: Sim_K to the reference below this
    stable_rank_band: float = 2.0  # alert: stable rank beyond [ref / band, ref x band]
    # W_t is rounded to this dtype first, as the run's checkpoints store it (bf16: opdgeom's exports;
    # None: weights as they are, for trainers that save fp32 checkpoints)
    checkpoint_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self):
        if self.every < 1 or self.k < 1 or self.iters < 1 or not 0 < self.reference_fraction <= 1:
            raise ValueError(f"monitor: every, k and iters must be >= 1 and reference_fraction in (0, 1], got {self}")


def reference_step(checkpoint_steps: list[int], steps: int, fraction: float) -> int:
    """The saved checkpoint nearest ``fraction`` x ``steps`` (ties to the earlier one)."""
    target = fraction * steps
    return min(checkpoint_steps, key=lambda s: (abs(s - target), s))


def top_right_subspace(
    dw_mn: torch.Tensor, k: int, iters: int, start_nk: torch.Tensor | None, seed: int, reduce: Reduce = _identity
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_nk, sigma_k): the top-k right singular vectors (float64, replicated) and values of the matrix
    whose row shard this rank holds, by block subspace iteration with Rayleigh-Ritz."""
    n = dw_mn.shape[1]
    block = min(n, 2 * k)
    generator = torch.Generator().manual_seed(seed)
    q_nb = torch.randn(n, block, generator=generator, dtype=torch.float64)
    if start_nk is not None:
        q_nb[:, : start_nk.shape[1]] = start_nk
    work = dw_mn.dtype
    q_nb = torch.linalg.qr(q_nb)[0].to(dw_mn.device, work)
    for _ in range(iters):
        y_nb = reduce(dw_mn.T @ (dw_mn @ q_nb)).to(torch.float64)
        q_nb = torch.linalg.qr(y_nb)[0].to(work)
    proj_mb = dw_mn @ q_nb
    t_bb = reduce(proj_mb.T @ proj_mb).to(torch.float64).cpu()
    evals_b, evecs_bb = torch.linalg.eigh((t_bb + t_bb.T) / 2)
    order = torch.argsort(evals_b, descending=True)[:k]
    v_nk = q_nb.to(torch.float64).cpu() @ evecs_bb[:, order]
    return v_nk, evals_b[order].clamp(min=0).sqrt()


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a parameter (an FSDP2 DTensor's local shard; a plain tensor as it is)."""
    value = param.detach()
    return value.to_local() if hasattr(value, "to_local") else value


def _row_range(param: torch.Tensor) -> tuple[int, int]:
    """Which rows of the whole matrix this rank's shard holds."""
    if not hasattr(param, "device_mesh"):
        return 0, param.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], offset[0] + shape[0]


@dataclass
class _Matrix:
    name: str
    numel: int
    w0_mn: torch.Tensor  # this rank's rows of the init, in the checkpoint dtype (bf16: what the init folder holds)
    rows: tuple[int, int]  # which rows of the whole matrix they are
    k: int
    basis_nk: torch.Tensor | None = None
    reference_nk: torch.Tensor | None = None
    reference_stable_rank: float = math.nan


@dataclass
class Report:
    step: int
    rows: list[dict] = field(default_factory=list)  # one per (matrix, metric), then the summaries
    summary: dict[str, float] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)


class ChannelMonitor:
    """Build it on the model as it starts (its weights are W_0), call ``observe`` at the ``due`` steps."""

    def __init__(self, model, settings: MonitorSettings, steps: int, checkpoint_steps: list[int], reduce=_identity):
        self.settings, self.steps, self.reduce = settings, steps, reduce
        self.reference_step = reference_step(checkpoint_steps, steps, settings.reference_fraction)
        self.matrices = []
        for name, param in model.named_parameters():
            if param.ndim == 2 and classify(name, 2).kind == "matrix":
                k = min(settings.k, *param.shape)
                w0 = _local(param).to(settings.checkpoint_dtype or param.dtype, copy=True)
                self.matrices.append(_Matrix(name, param.numel(), w0, _row_range(param), k))
        if not self.matrices:
            raise ValueError("monitor: the model has no layer matrices to watch")

    @torch.no_grad()
    def restore_reference(self, checkpoint_dir) -> None:
        """A resumed run past its reference step: the reference subspaces again, from the reference
        checkpoint's bf16 tensors (the same numbers the run had in memory), each rank reading its rows."""
        from safetensors import safe_open

        from opdgeom.geometry.stream import read_checkpoint

        entries = read_checkpoint(checkpoint_dir)
        for index, m in enumerate(self.matrices):
            with safe_open(entries[m.name].path, framework="pt") as f:
                w_ref = f.get_slice(m.name)[m.rows[0] : m.rows[1]].to(m.w0_mn.device)
            self._matrix(m, w_ref, index, self.reference_step)

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0 or step in (self.reference_step, self.steps)

    @torch.no_grad()
    def observe(self, model, step: int) -> Report:
        params = dict(model.named_parameters())
        report = Report(step)
        for index, m in enumerate(self.matrices):
            values = self._matrix(m, _local(params[m.name]), index, step)
            report.rows += [{"step": step, "tensor": m.name, "metric": k, "numel": m.numel, "value": v}
                            for k, v in values.items()]  # fmt: skip
        for metric in METRICS:
            pairs = [
                (r["value"], r["numel"]) for r in report.rows if r["metric"] == metric and math.isfinite(r["value"])
            ]
            weight = sum(p for _, p in pairs)
            report.summary[metric] = sum(v * p for v, p in pairs) / weight if weight else math.nan
            report.rows.append({"step": step, "tensor": SUMMARY, "metric": metric, "numel": weight,
                                "value": report.summary[metric]})  # fmt: skip
        if step > self.reference_step:
            report.alerts = self._alerts(report)
        return report

    def _matrix(self, m: _Matrix, w_local: torch.Tensor, index: int, step: int) -> dict[str, float]:
        work = torch.float64 if w_local.device.type == "cpu" else torch.float32
        w0 = m.w0_mn.to(work)
        w_t = w_local.to(m.w0_mn.dtype)  # W_t as its checkpoint holds it
        dw = w_t.to(work) - w0
        unchanged = unchanged_count(m.w0_mn, w_t, self.settings.eta)
        totals = self.reduce(torch.tensor([float((dw**2).sum()), float((w0**2).sum()), unchanged, dw.numel()],
                                          dtype=torch.float64, device=dw.device)).cpu()  # fmt: skip
        delta_sq, base_sq, unchanged, numel = totals.tolist()
        values = {
            "relative_update_norm": math.sqrt(delta_sq / base_sq) if base_sq > 0 else math.nan,
            "bf16_visible_fraction": 1.0 - unchanged / numel,
            "stable_rank": math.nan,
            "subspace_similarity_to_reference": math.nan,
        }
        if delta_sq == 0:
            return values
        m.basis_nk, sigma_k = top_right_subspace(
            dw, m.k, self.settings.iters, m.basis_nk, seed=index, reduce=self.reduce
        )
        values["stable_rank"] = delta_sq / float(sigma_k[0]) ** 2
        if step == self.reference_step:
            m.reference_nk, m.reference_stable_rank = m.basis_nk.clone(), values["stable_rank"]
        if m.reference_nk is not None:
            values["subspace_similarity_to_reference"] = subspace_similarity(m.basis_nk, m.reference_nk)
        return values

    def _alerts(self, report: Report) -> list[str]:
        """One line per bound crossed, naming the matrices beyond it (worst first) and by how much."""
        s, ref = self.settings, self.reference_step
        by = {(r["tensor"], r["metric"]): r["value"] for r in report.rows}
        sims = [(by[(m.name, METRICS[3])], m.name) for m in self.matrices if by[(m.name, METRICS[3])] < s.sim_below]
        band = []
        for m in self.matrices:
            rank, base = by[(m.name, "stable_rank")], m.reference_stable_rank
            if (
                math.isfinite(rank)
                and math.isfinite(base)
                and not base / s.stable_rank_band <= rank <= base * s.stable_rank_band
            ):
                band.append((abs(math.log(rank / base)), m.name, base, rank))
        lines = []
        if sims:
            worst = ", ".join(f"{name} {v:.2f}" for v, name in sorted(sims)[:5])
            lines.append(f"channel alert at step {report.step}: Sim_K to step {ref} below {s.sim_below} in "
                         f"{len(sims)} of {len(self.matrices)} matrices (lowest: {worst})")  # fmt: skip
        if band:
            worst = ", ".join(
                f"{name} {base:.2f} -> {rank:.2f}" for _, name, base, rank in sorted(band, reverse=True)[:5]
            )
            lines.append(f"channel alert at step {report.step}: stable rank outside x{s.stable_rank_band:g} of step "
                         f"{ref} in {len(band)} of {len(self.matrices)} matrices (furthest: {worst})")  # fmt: skip
        return lines
