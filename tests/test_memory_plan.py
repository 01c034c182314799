"""The memory plan: real parameter counts from meta-built configs, FSDP2's padded dim-0 sharding rule,
never below the analytic floor, the 8B pairs fit 8 x 80 GB, too-small requests are refused."""

import json

import pytest

from opdgeom.cli import main as cli_main
from opdgeom.train.memory_plan import (
    HUB_SHAPES,
    PHASES,
    check_fits,
    load_family_preset,
    plan,
    shard_numel,
    sharded,
)

HUB_FAMILIES = ["qwen3-8b", "llama3-8b", "qwen3-pilot"]


@pytest.mark.parametrize(
    "repo", ["Qwen/Qwen3-8B-Base", "Qwen/Qwen3-32B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B"]
)
def test_meta_built_parameter_counts_match_the_published_counts(repo):
    shape = HUB_SHAPES[repo]
    params = sharded(shape, 1).params
    assert params == pytest.approx(shape.published_params, rel=5e-3), (repo, params)


def test_exact_counts_of_the_study_pair():
    """Qwen3-8B: 36 layers, untied lm_head; the exact sum of its config's tensors."""
    assert sharded(HUB_SHAPES["Qwen/Qwen3-8B-Base"], 1).params == 8_190_735_360
    assert sharded(HUB_SHAPES["Qwen/Qwen3-32B"], 1).params == 32_762_123_264
    assert sharded(HUB_SHAPES["meta-llama/Llama-3.1-8B"], 1).params == 8_030_261_248


def test_shard_numel_is_fsdp2_padded_dim0_chunking():
    assert shard_numel((61, 32), 2) == 31 * 32  # torch.chunk: ceil(61 / 2) rows on rank 0, padded on rank 1
    assert shard_numel((151_936, 4096), 8) == 18_992 * 4096
    assert shard_numel((5,), 8) == 1  # 1-D norms: one padded element per rank
    assert shard_numel((), 8) == 1
    # Sharding over W never costs less than 1/W of the whole, and the padding is under one row per tensor.
    shape = HUB_SHAPES["Qwen/Qwen3-8B-Base"]
    whole, per_rank = sharded(shape, 1).shard_params, sharded(shape, 8).shard_params
    assert whole / 8 <= per_rank < whole / 8 + 400 * 12_288


@pytest.mark.parametrize("family", HUB_FAMILIES)
@pytest.mark.parametrize("gpus", [1, 2, 8, 16])
def test_plan_is_never_below_the_analytic_floor(family, gpus):
    result = plan(load_family_preset(family), gpus, 80)
    floor = (16 * result.student_params + 2 * result.teacher_params) / gpus
    for phase in PHASES:
        assert result.phase_bytes(phase) >= floor, (family, gpus, phase)
    assert result.peak_bytes == max(result.phase_bytes(p) for p in PHASES)


@pytest.mark.parametrize("family", ["qwen3-8b", "llama3-8b"])
def test_the_8b_studies_fit_8_gpus_of_80_gb_with_the_stated_headroom(family):
    result = check_fits(family, 8, 80)
    assert result.fits and result.peak_bytes <= 0.9 * 80e9
    assert result.headroom == 0.10


def test_pilot_fits_one_gpu():
    result = check_fits("qwen3-pilot", 1, 80)
    assert result.student == "Qwen/Qwen3-1.7B-Base" and result.teacher == "Qwen/Qwen3-4B"  # the largest of each
    assert result.peak_bytes < 72e9


def test_rollout_kv_cache_is_the_explicit_budget_when_smaller():
    """8192-token rollouts: all 64 of a rank's sequences would need 82 GB of KV (qwen3-8b); the preset's
    train.kv_cache_gb bounds the engine (the rest queue) and the plan counts exactly that budget."""
    family = load_family_preset("qwen3-8b")
    kv = {c.name: c.bytes for c in plan(family, 8, 80).components}["rollout kv cache"]
    assert kv == 24 * 2**30 and family["train"]["max_new_tokens"] == 8192
    unbounded = {**family, "train": {k: v for k, v in family["train"].items() if k != "kv_cache_gb"}}
    whole = {c.name: c.bytes for c in plan(unbounded, 8, 80).components}["rollout kv cache"]
    assert whole == 64 * (512 + 8192) * 2 * 36 * 8 * 128 * 2  # seqs x tokens x K,V x layers x kv_dim x bf16
    assert not plan(unbounded, 8, 80).fits and plan(family, 8, 80).fits  # the budget is what makes it fit
    generous = {**family, "train": {**family["train"], "kv_cache_gb": 1000}}
    assert {c.name: c.bytes for c in plan(generous, 8, 80).components}["rollout kv cache"] == whole


def test_too_small_a_request_is_refused_with_the_plans_numbers():
    with pytest.raises(ValueError, match=r"family 'qwen3-8b' does not fit 4 x 80 GB: peak \d+\.\d GB") as err:
        check_fits("qwen3-8b", 4, 80)
    assert "teacher" in str(err.value) and "optimizer" in str(err.value) or "rollout" in str(err.value)
    with pytest.raises(ValueError, match="qwen3-pilot"):
        check_fits("qwen3-pilot", 1, 16)


def test_cli_prints_the_plan_as_json(capsys):
    assert cli_main(["memory-plan", "--family", "qwen3-8b", "--gpus", "8", "--gpu-mem-gb", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["peak_bytes"] == out["phase_bytes"][out["peak_phase"]]
    names = {c["name"] for c in out["components"]}
    assert {"student params", "student grads", "optimizer", "teacher", "activations", "logits chunk"} <= names
    assert cli_main(["memory-plan", "--family", "llama3-8b", "--gpus", "2", "--gpu-mem-gb", "80"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_gpu_benchmark_runs_its_code_path_on_cpu(repo):
    """benchmarks/bench_train_memory.py --cpu-smoke: FSDP2 over a one-rank gloo group, bf16 policy,
    activation checkpointing, sharded bf16 teacher, chunked log-probs, OPD loss, AdamW; exits 0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench_train_memory.py"), "--cpu-smoke", "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update" in proc.stdout and "tokens/s" in proc.stdout and "peak" in proc.stdout


def test_the_rollout_engine_takes_the_kv_budget(tmp_path):
    """train.kv_cache_gb reaches the vLLM engine's kv_cache_bytes (never below one whole max_model_len
    sequence, which vLLM requires); without it the engine holds every rollout of the step at once."""
    import transformers

    from opdgeom.rollout.colocate import kv_bytes_per_token
    from opdgeom.spec import TrainSettings
    from opdgeom.train.distributed import SINGLE
    from opdgeom.train.run import engine_settings

    config = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=100,
                                      max_position_embeddings=4096)  # fmt: skip
    config.save_pretrained(tmp_path)
    base = {"steps": 1, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0,
            "checkpoint_every": 1, "max_new_tokens": 1024, "temperature": 1.0, "group_size": 4}  # fmt: skip
    per_token = kv_bytes_per_token(config, 4)  # fp32 on CPU
    whole = engine_settings(TrainSettings.from_dict(base), tmp_path, SINGLE, tmp_path)["kwargs"]["kv_cache_bytes"]
    assert whole == 64 * (512 + 1024) * per_token
    budget = 0.01  # GiB: fewer than the 64 rollouts at once
    bounded = engine_settings(TrainSettings.from_dict({**base, "kv_cache_gb": budget}), tmp_path, SINGLE, tmp_path)
    assert bounded["kwargs"]["kv_cache_bytes"] == int(budget * 2**30) < whole
    tiny = engine_settings(TrainSettings.from_dict({**base, "kv_cache_gb": 1e-6}), tmp_path, SINGLE, tmp_path)
    assert tiny["kwargs"]["kv_cache_bytes"] == bounded["kwargs"]["max_model_len"] * per_token  # one whole sequence
