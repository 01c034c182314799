"""Advantages, losses and token masks: hand-computed values, autograd, and toy optimisation."""

import math

import pytest
import torch

from opdgeom.train.objectives import (
    grpo_advantages,
    mix_advantages,
    opd_advantages,
    pg_loss,
    select_tokens,
    sft_loss,
)


def test_opd_advantage_is_negated_log_ratio():
    student = torch.tensor([[-1.0, -2.0, -0.5]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.equal(opd_advantages(student, teacher), torch.tensor([[-0.5, 1.0, 0.0]]))


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two groups of 3
    adv = grpo_advantages(rewards, group_size=3)
    mean, std = 1 / 3, math.sqrt(2 / 9)
    expected = [(1 - mean) / std, -mean / std, -mean / std]
    assert adv[:3].tolist() == pytest.approx(expected, rel=1e-5)
    # A group where every sample has the same reward carries no signal.
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]


def test_mix_advantages_broadcast_sequence_advantage():
    opd = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rlvr = torch.tensor([10.0, -10.0])
    mixed = mix_advantages(opd, rlvr, alpha=0.25)
    assert torch.allclose(mixed, torch.tensor([[0.25 + 7.5, 0.5 + 7.5], [0.75 - 7.5, 1.0 - 7.5]]))


def test_sft_loss_is_mean_masked_nll():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logp, mask).item() == pytest.approx((2 + 3 + 4) / 3)


def test_pg_loss_value_and_gradient_match_explicit_expression():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    behaviour = (logp.detach() + 0.1 * torch.randn(2, 4)).detach()
    adv = torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    loss = pg_loss(logp, behaviour, adv, mask)
    (grad,) = torch.autograd.grad(loss, logits)

    logits2 = logits.detach().clone().requires_grad_(True)
    logp2 = torch.log_softmax(logits2, -1)
    explicit = -(mask * torch.exp(logp2 - behaviour) * adv).sum() / mask.sum()
    (grad2,) = torch.autograd.grad(explicit, logits2)
    assert loss.item() == pytest.approx(explicit.item())
    assert torch.allclose(grad, grad2)


def test_pg_loss_on_policy_is_reinforce():
    """rho = 1 on-policy: the gradient is -sum m A grad log pi / N."""
    logits = torch.randn(3, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    adv, mask = torch.randn(3, 5), torch.ones(3, 5)
    loss = pg_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(adv.sum() / 15).item())
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_reinforce,) = torch.autograd.grad(-(adv * torch.log_softmax(logits, -1)).sum() / 15, logits)
    assert torch.allclose(grad, grad_reinforce)


def test_pg_loss_clip_bounds_rho():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[-5.0, 5.0]])  # rho = e^5 and e^-5
    loss = pg_loss(logp, behaviour, torch.ones(1, 2), torch.ones(1, 2), clip=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)


@pytest.mark.parametrize("keep", [0.5, 0.25])
@pytest.mark.parametrize("how", ["top", "random"])
def test_select_tokens_keeps_exact_fraction_of_valid_tokens(keep, how):
    torch.manual_seed(1)
    mask = (torch.rand(8, 30) > 0.3).float()
    scores = torch.randn(8, 30)
    kept = select_tokens(scores, mask, keep, how, torch.Generator().manual_seed(0))
    assert kept.sum().item() == math.floor(keep * mask.sum().item() + 0.5)
    assert ((kept == 1) <= (mask == 1)).all(), "kept a padding/prompt token"
    if how == "top":
        threshold = scores[kept.bool()].min()
        assert (scores[(mask.bool()) & ~kept.bool()] <= threshold).all()


def test_select_tokens_top_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 99.0], [0.7, 0.2, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # 99.0 is not a valid token
    kept = select_tokens(scores, mask, 0.5, "top")  # 7 valid tokens: keep 4 (half rounds up)
    assert kept.tolist() == [[0, 1, 1, 0], [1, 0, 1, 0]]


def test_random_selection_depends_on_generator_seed():
    mask = torch.ones(4, 50)
    a = select_tokens(mask, mask, 0.5, "random", torch.Generator().manual_seed(0))
    b = select_tokens(mask, mask, 0.5, "random", torch.Generator().manual_seed(0))
    c = select_tokens(mask, mask, 0.5, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- toy optimisation: a categorical policy over V tokens, one-token completions -------------


def _reverse_kl(student_logits, teacher_logp):
    p = torch.softmax(student_logits, -1)
    return (p * (torch.log_softmax(student_logits, -1) - teacher_logp)).sum().item()


def test_opd_steps_reduce_exact_reverse_kl_to_teacher():
    torch.manual_seed(0)
    vocab = 8
    teacher_logp = torch.log_softmax(torch.randn(vocab) * 2, -1)
    logits = torch.zeros(vocab, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    start = _reverse_kl(logits.detach(), teacher_logp)
    for _ in range(200):
        logp_V = torch.log_softmax(logits, -1)
        y_B = torch.multinomial(logp_V.exp().detach(), 64, replacement=True)
        logp_B1 = logp_V[y_B].unsqueeze(1)
        adv = opd_advantages(logp_B1.detach(), teacher_logp[y_B].unsqueeze(1))
        loss = pg_loss(logp_B1, logp_B1.detach(), adv, torch.ones_like(adv))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = _reverse_kl(logits.detach(), teacher_logp)
    assert end < 0.1 * start, (start, end)


def test_grpo_steps_raise_expected_reward():
    torch.manual_seed(0)
    vocab, group = 8, 8
    reward_V = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.float32)
    logits = torch.zeros(vocab, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    start = (torch.softmax(logits, -1) * reward_V).sum().item()
    for _ in range(100):
        logp_V = torch.log_softmax(logits, -1)
        y_B = torch.multinomial(logp_V.exp().detach(), 4 * group, replacement=True)
        adv_B = grpo_advantages(reward_V[y_B], group)
        logp_B1 = logp_V[y_B].unsqueeze(1)
        loss = pg_loss(logp_B1, logp_B1.detach(), adv_B.unsqueeze(1), torch.ones_like(logp_B1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = (torch.softmax(logits.detach(), -1) * reward_V).sum().item()
    assert start == pytest.approx(0.25) and end > 0.9
