"""Colocated vLLM engines under torchrun (issue 12): two CPU ranks (gloo, FSDP2), each holding a vLLM
engine that joined the job's process group (external_launcher), sampling its own half of every batch.

Engines run fp32 on CPU (the trainer's precision here), so an engine and the trainer compute the same
function up to summation order; test_vllm.py measured 5.5e-6 on sampled log-probs, LOGP_TOL = 1e-4.
- after every weight sync (from the FSDP shards, bucket by bucket) each rank's engine scores a fixed
  sequence as the trainer does (the check OPDGEOM_CHECK_ENGINE_SYNC=1 prints);
- with temperature-0 rollouts the run takes the same steps as the same run with transformers
  `generate` rollouts: same completions, so the same losses (printed to 4 significant digits: equal)
  and final weights within 1e-4 of the update's size (float summation order of two kernels);
- a rank SIGKILLed after the first checkpoint: the rerun builds fresh engines from the init folder,
  syncs them from the restored shards before its first rollout (checked like every sync), and ends
  on the uninterrupted run's weights exactly.
Each torchrun job costs ~20-40 s on 2 cores (vLLM import and two engine builds dominate).
"""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here: run under .venv-vllm (scripts/vllm_env.sh)")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_vllm import LOGP_TOL, SPEC, sft  # noqa: E402

from opdgeom.models import build_model, save_model  # noqa: E402
from opdgeom.tasks import MathTask, split, write_jsonl  # noqa: E402
from opdgeom.tokenizer import build_char_tokenizer  # noqa: E402
from opdgeom.train.checkpoint import full_trainer_state  # noqa: E402

pytestmark = pytest.mark.vllm

SETTINGS = {
    "steps": 6, "batch_size": 4, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 1, "grad_clip": 1.0,
    "checkpoint_every": 3, "max_new_tokens": 16, "temperature": 0.0, "group_size": 2,
}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPDGEOM_CHECK_ENGINE_SYNC": "1"}
CHECK = re.compile(
    r"engine sync check: rank=(\d) version=(.*?) tokens=\d+ max_abs_logp_diff=([0-9.e+-]+) sync_s=([0-9.]+)"
)
STEP = re.compile(r"^step (\d+)/\d+ (.*?) grad_norm", re.M)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("colocate")
    tokenizer = build_char_tokenizer()
    train, _ = split(MathTask(), 256, 4, seed=0)
    student = build_model(SPEC, tokenizer, seed=0)
    sft(student, tokenizer, train, steps=40, seed=0)  # peaked distributions: greedy is not decided by near-ties
    teacher = copy.deepcopy(student)
    sft(teacher, tokenizer, train, steps=40, seed=1)
    save_model(student, tokenizer, root / "student", dtype=torch.float32)
    save_model(teacher, tokenizer, root / "teacher", dtype=torch.float32)
    write_jsonl(root / "train.jsonl", train[:64])
    return root


def _cmd(root, engine: str, out) -> list[str]:
    spec = {
        "name": "c",
        "method": "opd",
        "init": "student",
        "domain": "math",
        "train": {**SETTINGS, "rollout_engine": engine},
    }
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "opdgeom", "train", "--spec", json.dumps(spec), "--init", str(root / "student"),
        "--teacher", str(root / "teacher"), "--train-data", str(root / "train.jsonl"), "--out", str(out),
    ]  # fmt: skip


def _train(root, engine: str, out) -> str:
    proc = subprocess.run(_cmd(root, engine, out), capture_output=True, text=True, env=ENV, timeout=400)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) + proc.stderr[-2000:]
    return proc.stderr


def _checks(log: str) -> list[tuple[int, str, float]]:
    return [(int(r), v, float(gap)) for r, v, gap, _ in CHECK.findall(log)]


def _steps(log: str) -> dict[int, str]:
    return {int(n): stats for n, stats in STEP.findall(log)}


@pytest.fixture(scope="module")
def straight(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vllm"
    return out, _train(models, "vllm", out)


def test_every_engine_matches_the_trainer_after_every_sync(straight):
    _, log = straight
    assert "2 colocated engine(s)" in log
    checks = _checks(log)
    # On-policy: every step's rollouts come after a sync (step 0 included), on both ranks.
    assert sorted((rank, version) for rank, version, _ in checks) == sorted(
        (rank, f"('step', {s})") for rank in (0, 1) for s in range(SETTINGS["steps"])
    )
    worst = max(gap for *_, gap in checks)
    assert worst < LOGP_TOL, f"an engine's log-probs differ from the trainer's by {worst:.2e} after a sync"


def test_losses_match_generate_rollouts_at_temperature_zero(models, straight, tmp_path):
    out, log = straight
    reference = _train(models, "hf", tmp_path / "hf")
    ours, theirs = _steps(log), _steps(reference)
    assert sorted(ours) == list(range(1, SETTINGS["steps"] + 1))
    for step in ours:  # reward, reverse_kl, loss, rollout_tokens: the same numbers
        assert ours[step].split() == theirs[step].split(), (step, ours[step], theirs[step])
    a, b = full_trainer_state(out)["model"], full_trainer_state(tmp_path / "hf")["model"]
    init = load_file(models / "student" / "model.safetensors")
    for name in a:
        moved, diff = (a[name] - init[name]).abs().max(), (a[name] - b[name]).abs().max()
        assert diff <= 1e-6 + 1e-4 * moved, (name, float(diff), float(moved))


def test_rank_killed_mid_run_resumes_with_engines_synced_from_its_state(models, straight, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(models, "vllm", out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (out / "trainer_state" / "meta.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    ranks = _rank_pids(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies mid-run; the launcher takes the others down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, ranks[0]):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"

    log = _train(models, "vllm", out)
    assert "resuming from step 3" in log
    checks = _checks(log)
    # Fresh engines hold the init weights: both sync from the restored shards before step 4's rollouts.
    assert {(r, v) for r, v, _ in checks} >= {(0, "('step', 3)"), (1, "('step', 3)")}
    assert all(v != "('step', 0)" for _, v, _ in checks), "the resumed run sampled from step 0 again"
    assert max(gap for *_, gap in checks) < LOGP_TOL
    a, b = full_trainer_state(straight[0])["model"], full_trainer_state(out)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), f"weights after resume differ from the uninterrupted run: {name}"


def _rank_pids(launcher: int) -> list[int]:
    """The launcher's worker processes, by their RANK."""
    deadline = time.time() + 30
    while time.time() < deadline:
        found = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == launcher:  # the launcher's children (each in a session of its own)
                ranks = [e for e in env if e.startswith(b"RANK=")]
                if ranks and b"TORCHELASTIC_RUN_ID" in b"".join(env):
                    found[int(ranks[0][5:])] = int(pid)
        if len(found) == 2:
            return [found[0], found[1]]
        time.sleep(0.1)
    raise AssertionError("no rank processes found under the launcher")


def test_greedy_completions_for_evaluation_agree_across_engines(models):
    """Evaluation's greedy decoding on vLLM gives transformers' completions (fp32 engine on CPU). In a
    process of its own: the function shuts its engine down, which tears down vLLM's process state."""
    code = (
        "import json, sys; from opdgeom.models import load_tokenizer; from opdgeom.tasks import MathTask, split;"
        "from opdgeom.tokens import encode_prompt; from opdgeom.rollout.greedy import greedy_completions as g;"
        f"d = {str(models / 'student')!r}; tok = load_tokenizer(d);"
        "prompts = [encode_prompt(tok, e.prompt) for e in split(MathTask(), 16, 8, seed=3)[1]];"
        "print(json.dumps([g(d, prompts, 24, engine=e) for e in ('hf', 'vllm')]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, vllm = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hf == vllm and len(hf) == 8
