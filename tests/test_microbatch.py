"""Micro-batches with gradient accumulation give the whole batch's loss and gradient (float64)."""

import functools

import pytest
import torch

from opdgeom.models import build_model
from opdgeom.spec import RunSpec
from opdgeom.tasks import MathTask, split
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.train.batches import score
from opdgeom.train.behaviour import FrozenPolicy
from opdgeom.train.methods import PolicyGradientMethod, SFTMethod

from conftest import SETTINGS, TINY


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    student = build_model(TINY, tok, seed=0).double()
    teacher = build_model(TINY, tok, seed=1).double().eval().requires_grad_(False)
    anchor = build_model(TINY, tok, seed=2).double()
    examples, _ = split(MathTask(), 32, 4, seed=0)
    return tok, student, teacher, anchor, examples


def accumulated(method, model, batch, max_tokens):
    """What the loop does: one backward per micro-batch; returns (summed loss, gradients, #micro-batches)."""
    model.zero_grad(set_to_none=True)
    groups = batch.split(max_tokens)
    total = 0.0
    for rows in groups:
        loss, _ = method.loss(model, batch.select(rows))
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}, len(groups)


def spec(method, **options) -> RunSpec:
    settings = {**SETTINGS, "batch_size": 6, "group_size": 2, "max_new_tokens": 12, **options.pop("train", {})}
    return RunSpec.from_json(
        {"name": "t", "method": method, "init": "s", "domain": "math", "train": settings, **options}
    )


def methods(setup):
    tok, student, teacher, anchor, examples = setup

    def teacher_scores(prompts, prompt_ids, completion_ids, batch):  # a teacher in the student's format
        return score(teacher, batch, max_tokens=None)

    pg = functools.partial(PolicyGradientMethod, tok, examples, MathTask(), seed=0, teacher=teacher_scores)
    return {
        "sft": SFTMethod(tok, examples, batch_size=8, seed=0),
        "opd.topkl": pg(spec("opd", token_mask={"select": "top", "keep": 0.5})),
        "mix": pg(spec("mix", alpha=0.25)),
        "opd.offanchor": pg(
            spec("opd", behaviour={"policy": "anchor"}, train={"rho_clip": 10}), behaviour=FrozenPolicy(anchor)
        ),
    }


@pytest.mark.parametrize("name", ["sft", "opd.topkl", "mix", "opd.offanchor"])
def test_micro_batches_sum_to_the_whole_batch(setup, name):
    student = setup[1]
    method = methods(setup)[name]
    torch.manual_seed(0)
    batch = method.batch(student, step=0)
    whole_loss, whole_grads, n_whole = accumulated(method, student, batch, None)
    widest = int(batch.attention_mask_BT.sum(dim=1).max())
    micro_loss, micro_grads, n_micro = accumulated(method, student, batch, 2 * widest)
    assert n_whole == 1 and n_micro >= 3
    assert micro_loss == pytest.approx(whole_loss, rel=1e-12, abs=1e-12)
    for param, grad in whole_grads.items():
        torch.testing.assert_close(micro_grads[param], grad, rtol=1e-10, atol=1e-12, msg=param)


def test_split_respects_the_budget_and_can_be_forced_to_more_parts(setup):
    method = methods(setup)["sft"]
    batch = method.batch(setup[1], step=0)
    lengths = batch.attention_mask_BT.sum(dim=1).tolist()
    budget = 2 * max(lengths)
    groups = batch.split(budget)
    assert sorted(r for g in groups for r in g) == list(range(batch.rows))
    assert all(len(g) * max(lengths[r] for r in g) <= budget for g in groups)
    forced = batch.split(budget, n_parts=len(groups) + 2)
    assert len(forced) == len(groups) + 2 and sorted(r for g in forced for r in g) == list(range(batch.rows))
    with pytest.raises(ValueError, match="micro-batches"):
        batch.split(None, n_parts=batch.rows + 1)
