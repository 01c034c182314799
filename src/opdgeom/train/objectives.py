"""Losses and advantages. Every method is an advantage function feeding one policy-gradient loss,
except SFT, which is token NLL. Shapes: B rows, T target positions (completion tokens masked)."""

from __future__ import annotations

import math

import torch


def sft_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token NLL over the completion tokens of the batch.

    ``normalizer`` replaces the local token count (data parallelism divides by the global count).
    """
    n = mask_BT.sum() if normalizer is None else normalizer
    return -(logp_BT * mask_BT).sum() / n.clamp(min=1)


def pg_loss(
    logp_BT: torch.Tensor,
    behaviour_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip: float | None = None,
    normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = -sum_t m_t * rho_t * A_t / N, with N = the number of kept (mask = 1) tokens
    (``normalizer`` overrides N, e.g. with the global count under data parallelism).

    rho_t = exp(log pi_theta - log pi_behaviour): exactly 1 on-policy, where the gradient reduces to
    the REINFORCE form sum m A grad log pi. ``clip`` bounds rho to [1/clip, clip] (PPO-style
    truncation without the min) so stale off-policy samples cannot blow the step up.
    """
    rho_BT = torch.exp(logp_BT - behaviour_logp_BT.detach())
    if clip is not None:
        rho_BT = rho_BT.clamp(1.0 / clip, clip)
    n = mask_BT.sum() if normalizer is None else normalizer
    return -(mask_BT * rho_BT * advantages_BT.detach()).sum() / n.clamp(min=1)


def opd_advantages(student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """A_t = -(log pi_student(y_t) - log pi_teacher(y_t)): the negated sampled-token reverse KL."""
    return -(student_logp_BT - teacher_logp_BT).detach()


def grpo_advantages(rewards_B: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps); rows are grouped consecutively, G per prompt."""
    rewards_NG = rewards_B.view(-1, group_size).float()
    mean_N1 = rewards_NG.mean(dim=1, keepdim=True)
    std_N1 = rewards_NG.std(dim=1, unbiased=False, keepdim=True)
    return ((rewards_NG - mean_N1) / (std_N1 + eps)).view(-1)


def mix_advantages(opd_BT: torch.Tensor, rlvr_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """A = alpha * A_OPD + (1 - alpha) * A_RLVR, the sequence advantage broadcast over tokens."""
    return alpha * opd_BT + (1.0 - alpha) * rlvr_B.unsqueeze(1)


def select_tokens(
    scores_BT: torch.Tensor, mask_BT: torch.Tensor, keep: float, how: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep floor(keep * n + 1/2) of the n valid (mask = 1) tokens of the batch, by top score or at random.

    ``how="top"`` keeps the largest scores (top-KL sparsification when scores are the per-token
    reverse KL); ``how="random"`` keeps a uniformly random subset of the same size. Ties in the
    top selection are broken by position (stable sort), so the mask is deterministic.
    """
    valid = mask_BT.flatten().nonzero().squeeze(1)
    n_keep = math.floor(keep * valid.numel() + 0.5)
    if how == "top":
        order = torch.sort(scores_BT.flatten()[valid], descending=True, stable=True).indices
    elif how == "random":
        order = torch.randperm(valid.numel(), generator=generator)
    else:
        raise ValueError(f"token selection must be 'top' or 'random', got {how!r}")
    kept_BT = torch.zeros_like(mask_BT).flatten()
    kept_BT[valid[order[:n_keep]]] = 1
    return kept_BT.view_as(mask_BT)
