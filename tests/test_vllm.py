"""VLLMEngine against transformers on a tiny Qwen3: greedy decoding, per-token log-probs, teacher
scoring, in-place weight sync, and a short OPD run that learns with vLLM rollouts.

Runs only in the environment made by scripts/vllm_env.sh (`OMP_NUM_THREADS=1 .venv-vllm/bin/pytest
tests/test_vllm.py`, ~30 s); elsewhere the module is skipped. Engines run in float32, so vLLM and
transformers compute the same function up to summation order: measured over 20 seeds x 20 prompts,
sampled-token log-probs agree to 5.5e-6 and scored ones to 1.8e-5. LOGP_TOL = 1e-4 leaves 5x
headroom for other CPUs' kernels and is still 1500x below the 0.15 by which the sync test's weight
noise moves them. (bf16 engines differ from transformers by up to 0.15 per token, mean 0.006,
and flip one greedy completion in 16: too coarse for these checks.)
"""

import copy
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here: run under .venv-vllm (scripts/vllm_env.sh)")

import torch  # noqa: E402

from opdgeom.logprobs import token_logprobs  # noqa: E402
from opdgeom.models import build_model, load_model, save_model  # noqa: E402
from opdgeom.rollout import HFEngine  # noqa: E402
from opdgeom.rollout.vllm_engine import VLLMEngine  # noqa: E402
from opdgeom.tasks import MathTask, split  # noqa: E402
from opdgeom.tokenizer import build_char_tokenizer  # noqa: E402
from opdgeom.tokens import encode_prompt, pack  # noqa: E402
from opdgeom.train.methods import SFTMethod  # noqa: E402
from opdgeom.train.objectives import opd_advantages, pg_loss  # noqa: E402

pytestmark = pytest.mark.vllm

SPEC = {
    "architecture": "qwen3", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip
LOGP_TOL = 1e-4
MAX_NEW = 32
KV_BYTES = 1 << 26  # 64 MiB holds ~16k tokens of this model: far more than any test batch needs


def sft(model, tokenizer, examples, steps: int, seed: int) -> None:
    method = SFTMethod(tokenizer, examples, batch_size=32, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        loss, _ = method.loss(model, method.batch(model, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A student SFT-trained a little and a teacher trained further from it, saved in float32.

    Training first makes the next-token distributions peaked, so greedy decoding is not decided
    by near-ties that rounding could flip; the extra teacher steps give OPD a gap to close.
    """
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = build_char_tokenizer()
    train, held_out = split(MathTask(), 512, 16, seed=0)
    student = build_model(SPEC, tokenizer, seed=0)
    sft(student, tokenizer, train, steps=40, seed=0)
    teacher = copy.deepcopy(student)
    sft(teacher, tokenizer, train, steps=40, seed=1)
    save_model(student, tokenizer, root / "student", dtype=torch.float32)
    save_model(teacher, tokenizer, root / "teacher", dtype=torch.float32)
    # Few-shot prompts longer than one KV block (128 tokens on CPU), so prefix caching engages.
    shots = "".join(e.prompt + e.completion + "\n" for e in train[8:12])
    return SimpleNamespace(
        root=root, tokenizer=tokenizer, student=student.eval(), teacher=teacher.eval(),
        prompts=[encode_prompt(tokenizer, e.prompt) for e in held_out],
        long_prompts=[encode_prompt(tokenizer, shots + e.prompt) for e in held_out[:4]],
        train_prompts=[encode_prompt(tokenizer, e.prompt) for e in train[:8]],
    )  # fmt: skip


# Every engine lives as long as the module: in-process vLLM engines share one process-wide
# parallel state, and the first engine to be garbage-collected tears it down under the others.
@pytest.fixture(scope="module")
def student_engine(world):
    return VLLMEngine(world.root / "student", kv_cache_bytes=KV_BYTES)


@pytest.fixture(scope="module")
def teacher_engine(world):
    return VLLMEngine(world.root / "teacher", kv_cache_bytes=KV_BYTES)


@pytest.fixture(scope="module")
def synced_engine(world):
    """An engine over its own copy of the student, so its folder can be emptied under it."""
    save_model(world.student, world.tokenizer, world.root / "synced", dtype=torch.float32)
    return VLLMEngine(world.root / "synced", kv_cache_bytes=KV_BYTES)


@pytest.fixture(scope="module")
def opd_engine(world):
    return VLLMEngine(world.root / "student", kv_cache_bytes=KV_BYTES)


@torch.no_grad()
def hf_logprobs(model, prompts, completions) -> list[list[float]]:
    """transformers' log pi of each completion token, cut out of the trainer's (B, T-1) grid."""
    batch = pack(prompts, completions, pad_id=0)  # any pad id: padded positions are masked and cut away
    logp_BT = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    return [logp_BT[i, len(p) - 1 : len(p) + len(c) - 1].tolist() for i, (p, c) in enumerate(zip(prompts, completions))]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(r) for r in a] == [len(r) for r in b]
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def assert_same(a, b) -> None:
    gap = max_gap(a, b)
    assert gap < LOGP_TOL, f"log-probs differ by up to {gap:.2e}"


def assert_different(a, b) -> None:
    gap = max_gap(a, b)
    assert gap > 100 * LOGP_TOL, f"log-probs agree to {gap:.2e}: not another model"


def test_greedy_matches_transformers(world, student_engine):
    ours = student_engine.sample(world.prompts, MAX_NEW, temperature=0.0, seed=0)
    reference = HFEngine(world.student, world.tokenizer).sample(world.prompts, MAX_NEW, temperature=0.0, seed=0)
    assert ours.completion_ids == reference.completion_ids
    eos = world.tokenizer.eos_token_id
    assert any(c[-1] == eos for c in ours.completion_ids), "no completion stopped at eos"
    assert all(eos not in c[:-1] for c in ours.completion_ids)


def test_sampling_is_seeded_per_request(world, student_engine):
    group = [world.prompts[0]] * 8  # one GRPO group: identical prompts must still get distinct samples
    first = student_engine.sample(group, MAX_NEW, temperature=1.0, seed=5)
    assert first.completion_ids == student_engine.sample(group, MAX_NEW, temperature=1.0, seed=5).completion_ids
    assert first.completion_ids != student_engine.sample(group, MAX_NEW, temperature=1.0, seed=6).completion_ids
    assert len({tuple(c) for c in first.completion_ids}) > 1


def test_sampled_logprobs_match_transformers(world, student_engine):
    rollouts = student_engine.sample(world.prompts * 2, MAX_NEW, temperature=1.0, seed=1)
    reference = hf_logprobs(world.student, rollouts.prompt_ids, rollouts.completion_ids)
    assert_same(rollouts.completion_logprobs, reference)


def test_score_matches_transformers_teacher(world, student_engine, teacher_engine):
    rollouts = student_engine.sample(world.prompts, MAX_NEW, temperature=1.0, seed=2)
    scores = teacher_engine.score(rollouts.prompt_ids, rollouts.completion_ids)
    assert_same(scores, hf_logprobs(world.teacher, rollouts.prompt_ids, rollouts.completion_ids))
    # The teacher really is another model: its scores are not the student's.
    assert_different(scores, rollouts.completion_logprobs)


def test_sync_weights_in_place_without_files(world, synced_engine):
    engine, folder = synced_engine, world.root / "synced"
    prompts = world.prompts + world.long_prompts
    before = engine.sample(prompts, MAX_NEW, temperature=1.0, seed=3)

    model = copy.deepcopy(world.student)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02 * param.std())
    # Gone from disk: the new weights can only arrive through memory, and nothing may be written.
    for path in folder.iterdir():
        path.unlink()
    files_before = sorted(world.root.rglob("*"))
    engine.sync_weights(model)
    assert sorted(world.root.rglob("*")) == files_before

    # Same prompts as before the sync: a stale prefix cache would serve the old weights' KV here.
    after = engine.sample(prompts, MAX_NEW, temperature=1.0, seed=3)
    assert_same(after.completion_logprobs, hf_logprobs(model, after.prompt_ids, after.completion_ids))
    old = hf_logprobs(world.student, after.prompt_ids, after.completion_ids)
    assert_different(after.completion_logprobs, old)
    rescored = engine.score(before.prompt_ids, before.completion_ids)
    assert_same(rescored, hf_logprobs(model, before.prompt_ids, before.completion_ids))


def test_opd_with_vllm_rollouts_reduces_reverse_kl(world, opd_engine, teacher_engine):
    """OPD as the study runs it, with vLLM sampling the student and scoring with the teacher.

    Each step: G samples per prompt from the engine, teacher log-probs by engine.score, the
    student's own log-probs recomputed by the trainer, the policy-gradient loss with
    A_t = -(log pi_s - log pi_t), an AdamW step, then sync_weights so the next rollouts are
    on-policy. The sampled reverse KL of the first steps must fall clearly by the last ones.
    """
    steps, group, engine = 20, 4, opd_engine
    model = load_model(world.root / "student").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    prompts = [p for p in world.train_prompts for _ in range(group)]
    kls = []
    for step in range(steps):
        rollouts = engine.sample(prompts, MAX_NEW, temperature=1.0, seed=step)
        batch = pack(rollouts.prompt_ids, rollouts.completion_ids, pad_id=world.tokenizer.pad_token_id)
        mask_BT = batch["target_mask"]
        teacher_BT = torch.zeros_like(mask_BT)
        teacher_scores = teacher_engine.score(rollouts.prompt_ids, rollouts.completion_ids)
        for i, (p, scores) in enumerate(zip(rollouts.prompt_ids, teacher_scores)):
            teacher_BT[i, len(p) - 1 : len(p) - 1 + len(scores)] = torch.tensor(scores)
        logp_BT = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        advantages_BT = opd_advantages(logp_BT.detach(), teacher_BT)
        kls.append((-(advantages_BT * mask_BT).sum() / mask_BT.sum()).item())
        loss = pg_loss(logp_BT, logp_BT.detach(), advantages_BT, mask_BT)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        engine.sync_weights(model)
    start, end = sum(kls[:3]) / 3, sum(kls[-3:]) / 3
    assert end < 0.7 * start, "reverse KL per step did not fall: " + " ".join(f"{kl:.3f}" for kl in kls)


def test_training_loop_runs_opd_with_the_vllm_engine(world, tmp_path):
    """The real path: `opdgeom train` with rollout_engine vllm (its own process, its own engine)."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from opdgeom.tasks import write_jsonl

    train, _ = split(MathTask(), 64, 4, seed=0)
    write_jsonl(tmp_path / "train.jsonl", train)
    settings = {
        "steps": 4, "batch_size": 4, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 1, "grad_clip": 1.0,
        "checkpoint_every": 2, "max_new_tokens": 16, "temperature": 1.0, "group_size": 2, "rollout_engine": "vllm",
    }  # fmt: skip
    spec = {"name": "v", "method": "opd", "init": "student", "domain": "math", "train": settings}
    cmd = [
        sys.executable, "-m", "opdgeom", "train", "--spec", json.dumps(spec), "--init", str(world.root / "student"),
        "--teacher", str(world.root / "teacher"), "--train-data", str(tmp_path / "train.jsonl"),
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4/4" in proc.stderr and "rollout_tok/s" in proc.stderr
    final = load_file(tmp_path / "run" / "step_000004" / "model.safetensors")
    start = load_file(world.root / "student" / "model.safetensors")
    assert any(not torch.equal(final[k], start[k].to(final[k].dtype)) for k in final)


@pytest.fixture(scope="module")
def schedule_engine(world):
    return VLLMEngine(world.root / "student", kv_cache_bytes=KV_BYTES)


def test_engine_follows_the_behaviour_policy(world, schedule_engine):
    """The colocated engine takes new weights exactly when the behaviour's change: never for the frozen
    anchor (it was built from it), at steps 0, lag, 2 lag for a lagged copy, every step on-policy; and
    after each sync it scores like the model it synced from."""
    from opdgeom.rollout.colocate import ColocatedRollout, behaviour_version, model_logprobs
    from opdgeom.train.behaviour import FrozenPolicy, LaggedPolicy, OnPolicy

    check = world.long_prompts[0]
    policy = copy.deepcopy(world.student)
    generator = torch.Generator().manual_seed(1)

    def update():  # a stand-in for an optimizer step
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02 * param.std())

    def engine_logp():
        return schedule_engine.score([check[:1]], [check[1:]])[0]

    anchor = ColocatedRollout(schedule_engine)
    frozen = FrozenPolicy(copy.deepcopy(world.student))
    for step in range(3):
        update()
        assert not anchor.prepare(frozen.sampler(policy, step), behaviour_version(frozen, step))
    assert_same([engine_logp()], [model_logprobs(world.student, check)])  # still the anchor

    rollout, lagged = ColocatedRollout(schedule_engine), LaggedPolicy(copy.deepcopy(world.student), lag=2)
    synced = []
    for step in range(5):
        sampler = lagged.sampler(policy, step)
        synced.append(rollout.prepare(sampler, behaviour_version(lagged, step)))
        assert_same([engine_logp()], [model_logprobs(sampler, check)])
        update()
    assert synced == [True, False, True, False, True]

    on_policy = OnPolicy()
    synced = [rollout.prepare(policy, behaviour_version(on_policy, step)) for step in range(2)]
    assert synced == [True, True]
    assert_same([engine_logp()], [model_logprobs(policy, check)])


def test_engine_teacher_matches_the_transformers_teacher(world, student_engine, teacher_engine):
    """OPD's teacher log-probs from an engine equal the transformers teacher's at every completion position
    (the only positions OPD reads), so the advantage A_t = -(log pi_s - log pi_t) is the same."""
    from opdgeom.rollout.colocate import engine_teacher
    from opdgeom.train.batches import TokenBatch
    from opdgeom.train.distributed import SINGLE
    from opdgeom.train.methods import score

    rollouts = student_engine.sample(world.prompts, MAX_NEW, temperature=1.0, seed=4)
    packed = pack(rollouts.prompt_ids, rollouts.completion_ids, pad_id=world.tokenizer.pad_token_id)
    mask_BT = packed["target_mask"]
    batch = TokenBatch(packed["input_ids"], packed["attention_mask"], mask_BT, torch.tensor(1.0))
    batch.extra = {"completion_mask_BT": mask_BT}
    ours_BT = engine_teacher(teacher_engine)(batch)
    reference_BT = score(world.teacher, batch, None, SINGLE)
    gap = ((ours_BT - reference_BT).abs() * mask_BT).max().item()
    assert gap < LOGP_TOL, f"engine teacher differs by {gap:.2e}"
    assert (ours_BT[mask_BT == 0] == 0).all()


def test_a_vllm_build_for_another_torch_fails_before_any_engine(monkeypatch):
    from opdgeom.rollout.colocate import check_vllm_build

    assert "torch" in check_vllm_build()  # this environment's pair matches
    monkeypatch.setattr(torch, "__version__", "2.12.1+cu128")
    with pytest.raises(RuntimeError, match=r"was built for torch 2\.13\.0.*has torch 2\.12\.1.*pip install"):
        check_vllm_build()


def test_an_engine_that_cannot_fit_beside_the_trainer_fails_before_the_first_step(world):
    """make_engine sizes the engine's KV cache from the rollout (batch_size x group_size / W sequences)
    and refuses, naming what to cut, when it and the trainer's sharded state exceed the memory here."""
    from opdgeom.spec import TrainSettings
    from opdgeom.train.distributed import SINGLE
    from opdgeom.train.run import make_engine

    settings = TrainSettings(
        steps=1, batch_size=1 << 20, lr=1e-3, weight_decay=0.0, warmup_steps=1, grad_clip=1.0, checkpoint_every=1,
        max_new_tokens=64, temperature=1.0, group_size=64, rollout_engine="vllm",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"does not fit: .* KV cache .*max_new_tokens.*rollout_engine: hf"):
        make_engine(settings, world.root / "student", SINGLE)
