"""opdgeom watch: a background writer fills a TRL-style folder with checkpoints (each model.safetensors
written in two chunks, trainer_state.json last); the watcher computes every checkpoint's statistics
once, hands the pipeline complete checkpoints only, updates the page, and ends when the run is
marked finished, after one pass (--once), or on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdgeom.diagnose import Settings
from opdgeom.diagnose import follow as follow_module
from opdgeom.diagnose.follow import Scanner, finished, follow
from opdgeom.geometry.cache import StatCache
from opdgeom.models import build_model, save_model
from opdgeom.tokenizer import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "source": "build", "architecture": "qwen3", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip
STEPS = [10, 20, 30, 40]
K = 4

# The writer: stdlib only (starts in milliseconds). Copies staged checkpoints into RUN the way a
# trainer writes them: config and tokenizer first, model.safetensors in two chunks with a pause
# between (a truncated file for HALF_S), a line in LOG once the weights are complete, then
# trainer_state.json (the Trainer's last file).
WRITER = r"""
import json, os, shutil, sys, time
staging, run, log, half_s, gap_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
time.sleep(0.5)
for name in sorted(os.listdir(staging), key=lambda n: int(n.split("-")[1])):
    src, dst = os.path.join(staging, name), os.path.join(run, name)
    os.makedirs(dst)
    for f in sorted(os.listdir(src)):
        if f not in ("model.safetensors", "trainer_state.json"):
            shutil.copy(os.path.join(src, f), dst)
    data = open(os.path.join(src, "model.safetensors"), "rb").read()
    with open(os.path.join(dst, "model.safetensors"), "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(half_s)
        fh.write(data[len(data) // 2 :])
    with open(log, "a") as fh:
        fh.write(name.split("-")[1] + "\n")
    shutil.copy(os.path.join(src, "trainer_state.json"), dst)
    time.sleep(gap_s)
"""


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> dict:
    """A bf16 base and four TRL checkpoints of it (staged outside any watched folder)."""
    root = tmp_path_factory.mktemp("follow")
    tok = build_char_tokenizer()
    model = build_model(TINY, tok, seed=0)
    save_model(model, tok, root / "base")
    generator = torch.Generator().manual_seed(1)
    staging = root / "staging"
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        folder = save_model(model, tok, staging / f"checkpoint-{step}")
        state = {"global_step": step, "max_steps": STEPS[-1], "log_history": []}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return {"root": root, "base": root / "base", "staging": staging}


def settings(cache: Path) -> Settings:
    return Settings(k=K, trajectory_k=K, cache=cache, progress=False)


def page_steps(out: Path) -> list[int]:
    return [c["step"] for c in json.loads((out / "inputs.json").read_text())["runs"][0]["checkpoints"]]


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics, prefix="train"):
        self.rows.append((step, prefix, dict(metrics)))


def test_follow_a_folder_being_written(staged, tmp_path, monkeypatch, capsys):
    run, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "weights-complete.log"
    run.mkdir()
    log.touch()

    misses: Counter = Counter()
    original = StatCache.get_or_compute

    def counting(self, digests, statistic, params, compute):
        def computed():
            misses[(tuple(digests), statistic, json.dumps(params, sort_keys=True))] += 1
            return compute()

        return original(self, digests, statistic, params, computed)

    monkeypatch.setattr(StatCache, "get_or_compute", counting)

    handed: list[list[int]] = []  # the steps the pipeline was given, with the writer's log at that moment
    original_prepare = follow_module.prepare

    def checking_prepare(base_folder, run_):
        steps = [c.step for c in run_.checkpoints]
        complete = {int(line) for line in log.read_text().split()}
        assert set(steps) <= complete, f"pipeline handed {steps}, weights complete only for {sorted(complete)}"
        handed.append(steps)
        return original_prepare(base_folder, run_)

    monkeypatch.setattr(follow_module, "prepare", checking_prepare)

    updates = []

    def on_update(info):
        delta = sum(n for (_, stat, _), n in misses.items() if stat == "delta_spectrum")
        assert page_steps(out) == info["steps"]
        html = (out / "index.html").read_text()
        assert ", ".join(map(str, info["steps"])) in html
        updates.append({**info, "delta_total": delta})

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(staged["staging"]), str(run), str(log), "1.0", "0.3"],
    )
    tracker = Recorder()
    started = time.monotonic()
    try:
        n = follow(
            str(staged["base"]), run, out, settings(tmp_path / "cache"), poll_s=0.2, max_idle_s=40,
            tracker=tracker, on_update=on_update,
        )  # fmt: skip
    finally:
        writer.wait(timeout=60)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    print(err)  # shown by pytest -rA
    assert writer.returncode == 0
    assert "update failed" not in err, err
    assert "no new checkpoint" not in err, err  # ended because the run was marked finished
    assert "run finished (checkpoint-40 reached max_steps 40)" in err, err
    # the watcher saw a half-written checkpoint and waited for it
    assert "waiting for step 10 (checkpoint-10)" in err and "truncated" in err, err
    assert n == len(updates) >= 2 and elapsed < 45  # the page was updated while the writer ran
    assert page_steps(out) == STEPS and handed[-1] == STEPS
    assert all(steps == sorted(steps) for steps in handed)

    # every statistic computed once; each update decomposed exactly its new checkpoints' updates
    assert misses and set(misses.values()) == {1}, [k for k, v in misses.items() if v > 1]
    per_checkpoint = updates[-1]["delta_total"] // len(STEPS)
    assert per_checkpoint > 0 and updates[-1]["delta_total"] == per_checkpoint * len(STEPS)
    previous = 0
    for info in updates:
        assert info["delta_total"] - previous == per_checkpoint * len(info["new"]), updates
        previous = info["delta_total"]
    # one tracker row per checkpoint, the page's trajectory summary
    assert [step for step, _, _ in tracker.rows] == STEPS
    assert all(prefix == "geometry" and "stable_rank" in m for _, prefix, m in tracker.rows)


def test_once_on_a_finished_folder(staged, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(staged["staging"], run)
    (run / ".finished").touch()
    cache = tmp_path / "cache"
    seen = []
    assert follow(str(staged["base"]), run, tmp_path / "out", settings(cache), once=True, on_update=seen.append) == 1
    assert page_steps(tmp_path / "out") == STEPS and seen[0]["computed"] > 0
    # a second pass (another process would do the same) computes nothing: the cache has it all
    assert follow(str(staged["base"]), run, tmp_path / "out2", settings(cache), once=True, on_update=seen.append) == 1
    assert seen[1]["computed"] == 0 and seen[1]["reused"] > 0
    assert page_steps(tmp_path / "out2") == STEPS


def test_sigterm_leaves_a_complete_page(staged, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    for step in STEPS[:2]:
        shutil.copytree(staged["staging"] / f"checkpoint-{step}", run / f"checkpoint-{step}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "opdgeom", "watch", str(staged["base"]), str(run), "--out", str(out),
        "--poll", "0.2", "--k", str(K), "--trajectory-k", str(K), "--cache", str(tmp_path / "cache"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "index.html").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err, err
    assert page_steps(out) == STEPS[:2]
    html = (out / "index.html").read_text()
    assert html.rstrip().endswith("</html>") and "10, 20" in html
    assert not list(out.glob(".watch-tmp-*"))


def test_completeness_rules(staged, tmp_path):
    """verl: stable for one scan; sharded: every shard the index names; opdgeom: renamed step folders and
    manifest.json (finished when its records reach the spec's steps)."""
    source = staged["staging"] / "checkpoint-10"
    verl = tmp_path / "verl"
    hf = verl / "global_step_5" / "actor" / "huggingface"
    shutil.copytree(source, hf)
    scanner = Scanner(verl, settle_s=60)
    assert scanner.scan() == {} and scanner.layout == "verl"  # just written: not yet known to be stable
    assert list(scanner.scan()) == [5]  # unchanged since the previous scan

    sharded = verl / "global_step_6" / "actor" / "huggingface"
    sharded.mkdir(parents=True)
    shutil.copy(source / "config.json", sharded)
    state = load_file(source / "model.safetensors")
    names = sorted(state)
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    save_file({n: state[n] for n in names[0::2]}, sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for _ in range(3):
        assert list(scanner.scan()) == [5]  # shard 2 missing, however stable
    save_file({n: state[n] for n in names[1::2]}, sharded / "model-00002-of-00002.safetensors")
    scanner.scan()
    assert list(scanner.scan()) == [5, 6] and finished(verl, "verl", scanner.accepted) is None
    (verl / ".finished").touch()
    assert finished(verl, "verl", scanner.accepted) == ".finished present"

    ours = tmp_path / "ours"
    shutil.copytree(source, ours / "step_000010")
    shutil.copytree(source, ours / ".step_000020.tmp-x")  # the exporter's folder before its rename
    scanner = Scanner(ours, settle_s=60)
    assert list(scanner.scan()) == [10] and scanner.layout == "opdgeom"  # renamed into place: complete
    records = [{"step": 0, "path": "../init"}, {"step": 10, "path": "step_000010"}]
    manifest = {"run": {"name": "r", "train": {"steps": 20}}, "checkpoints": records}
    (ours / "manifest.json").write_text(json.dumps(manifest))
    assert finished(ours, "opdgeom", scanner.accepted) is None
    os.rename(ours / ".step_000020.tmp-x", ours / "step_000020")
    manifest["checkpoints"].append({"step": 20, "path": "step_000020"})
    (ours / "manifest.json").write_text(json.dumps(manifest))
    assert list(scanner.scan()) == [10, 20]
    assert finished(ours, "opdgeom", scanner.accepted) == "manifest.json records reach step 20"
