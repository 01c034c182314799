"""Micro-batches with gradient accumulation give the whole batch's loss and gradient (float64)."""

import functools
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from opdgeom.models import build_model, save_model
from opdgeom.spec import RunSpec
from opdgeom.tasks import MathTask, split
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.tokens import pack
from opdgeom.train.batches import score
from opdgeom.train.behaviour import FrozenPolicy
from opdgeom.train.distributed import SINGLE
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
        return score(teacher, batch, max_tokens=None, world=SINGLE)

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


# Each rank scores rows of its own lengths under a sharded frozen model: rank 0's four short rows fit
# one micro-batch of RANK_BUDGET tokens, rank 1's four long rows need four.
RANK_WORKER = """
import sys
from pathlib import Path

import torch

from opdgeom.train.batches import score
from opdgeom.train.distributed import load_sharded, setup, teardown

sys.path.insert(0, sys.argv[3])
from test_microbatch import RANK_BUDGET, rank_batch

world = setup()
model = load_sharded(Path(sys.argv[1]), world, torch.float32, frozen=True)
logp_BT = score(model, rank_batch(world.rank), RANK_BUDGET, world)
torch.save(logp_BT, Path(sys.argv[2]) / f"rank{world.rank}.pt")
teardown(world)
"""
RANK_BUDGET = 24


def rank_batch(rank: int):
    from opdgeom.train.batches import TokenBatch

    length = 3 if rank == 0 else 20
    gen = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(4, 60, (2,), generator=gen).tolist() for _ in range(4)]
    completions = [torch.randint(4, 60, (length,), generator=gen).tolist() for _ in range(4)]
    rows = pack(prompts, completions, pad_id=0)
    return TokenBatch(rows["input_ids"], rows["attention_mask"], rows["target_mask"], torch.tensor(1.0))


def test_micro_batches_are_as_many_on_every_rank():
    """One pass per group, and a sharded model all-gathers on every pass: each rank splits into the
    largest group count of any rank (with one process, the plain split)."""
    short, long = rank_batch(0), rank_batch(1)
    assert len(short.split(RANK_BUDGET)) == 1 and len(long.split(RANK_BUDGET)) == 4
    assert short.micro_batches(RANK_BUDGET, SINGLE) == short.split(RANK_BUDGET)


@pytest.mark.distributed
def test_two_ranks_score_rows_of_unequal_lengths_without_deadlock(tmp_path):
    """Scoring through a sharded model, where one rank needs one micro-batch and the other four. With
    unequal pass counts, NCCL ranks wait on each other's all-gathers until the collective timeout (the
    test's timeout ends it) and a gloo rank fails once its peer has left; with equal counts each rank's
    log-probs are the unsharded model's."""
    tok = build_char_tokenizer()
    save_model(build_model(TINY, tok, seed=0), tok, tmp_path / "model")
    (tmp_path / "worker.py").write_text(RANK_WORKER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*launcher, str(tmp_path / "worker.py"), str(tmp_path / "model"), str(tmp_path), os.path.dirname(__file__)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPDGEOM_COLLECTIVE_TIMEOUT_MIN": "2"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.communicate()
        pytest.fail("the two ranks deadlocked while scoring (unequal micro-batch counts)")
    assert proc.returncode == 0, stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    for rank in (0, 1):
        batch = rank_batch(rank)
        expected_BT = score(model, batch, None, SINGLE)
        got_BT = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got_BT, expected_BT, atol=1e-5), (rank, (got_BT - expected_BT).abs().max())
