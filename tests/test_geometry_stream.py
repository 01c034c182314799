"""Checkpoint streaming: names, lazy pairs, and every validation error naming file and tensor."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opdgeom.geometry.stream import CheckpointError, TensorInfo, classify, iter_tensor_pairs, iter_tensors


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {
        "model.embed_tokens.weight": torch.randn(12, 8, generator=gen),
        "model.norm.weight": torch.ones(8),
        "lm_head.weight": torch.randn(12, 8, generator=gen),
    }
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        state[f"{prefix}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=gen)
        state[f"{prefix}.self_attn.k_norm.weight"] = torch.ones(4)
        state[f"{prefix}.mlp.gate_proj.weight"] = torch.randn(16, 8, generator=gen)
        state[f"{prefix}.input_layernorm.weight"] = torch.ones(8)
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def write_model(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "name, ndim, expected",
    [
        ("model.layers.3.self_attn.q_proj.weight", 2, TensorInfo("matrix", 3, "q_proj")),
        ("model.layers.11.mlp.gate_proj.weight", None, TensorInfo("matrix", 11, "gate_proj")),
        ("model.layers.0.input_layernorm.weight", 1, TensorInfo("vector", 0, "input_layernorm")),
        ("model.layers.0.post_attention_layernorm.weight", None, TensorInfo("vector", 0, "post_attention_layernorm")),
        ("model.layers.2.self_attn.k_norm.weight", None, TensorInfo("vector", 2, "k_norm")),
        ("model.layers.2.self_attn.q_proj.bias", None, TensorInfo("vector", 2, "q_proj.bias")),
        ("model.embed_tokens.weight", 2, TensorInfo("embedding", None, "embed_tokens")),
        ("lm_head.weight", 2, TensorInfo("lm_head", None, "lm_head")),
        ("model.norm.weight", 1, TensorInfo("vector", None, "norm")),
        ("transformer.h.5.attn.c_attn.weight", 2, TensorInfo("matrix", 5, "c_attn")),
        ("transformer.h.5.ln_1.weight", None, TensorInfo("vector", 5, "ln_1")),
    ],
)
def test_classify(name, ndim, expected):
    assert classify(name, ndim) == expected


@pytest.mark.parametrize("shards", [1, 3])
def test_pairs_are_lazy_ordered_and_exact(tmp_path, shards):
    state_a, state_b = tiny_state(0), tiny_state(1)
    dir_a = write_model(tmp_path / "a", state_a)
    dir_b = write_model(tmp_path / "b", state_b, shards=shards)
    pairs = iter_tensor_pairs(dir_a, dir_b)
    first = next(pairs)
    assert first.info.layer is None  # non-layer tensors first, then layer by layer
    seen = [first] + list(pairs)
    assert sorted(p.name for p in seen) == sorted(state_a)
    layers = [p.info.layer for p in seen if p.info.layer is not None]
    assert layers == sorted(layers)
    for pair in seen:
        assert torch.equal(pair.w0, state_a[pair.name]) and torch.equal(pair.w1, state_b[pair.name])
        assert pair.info == classify(pair.name, pair.w0.dim())
    assert dict(iter_tensors(dir_b)).keys() == state_b.keys()


def test_missing_folder_and_file(tmp_path):
    dir_a = write_model(tmp_path / "a", tiny_state())
    with pytest.raises(CheckpointError, match="does not exist"):
        list(iter_tensor_pairs(dir_a, tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        list(iter_tensor_pairs(dir_a, tmp_path / "empty"))


def test_truncated_file_names_file_and_tensor(tmp_path):
    dir_a = write_model(tmp_path / "a", tiny_state())
    dir_b = write_model(tmp_path / "b", tiny_state(1))
    path = dir_b / "model.safetensors"
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    path.write_bytes(raw[:-10])
    data_bytes = len(raw) - 10 - 8 - header_len
    cut = [n for n, m in header.items() if n != "__metadata__" and m["data_offsets"][1] > data_bytes]
    with pytest.raises(CheckpointError) as err:
        next(iter_tensor_pairs(dir_a, dir_b))
    message = str(err.value)
    assert str(path) in message and "truncated" in message
    assert any(name in message for name in cut)


@pytest.mark.parametrize("garbage", [b"\xff" * 8 + b"{}", (20).to_bytes(8, "little") + b"not json at all....."])
def test_corrupt_header(tmp_path, garbage):
    dir_a = write_model(tmp_path / "a", tiny_state())
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError) as err:
        list(iter_tensor_pairs(dir_a, bad))
    assert str(bad / "model.safetensors") in str(err.value)


def test_name_sets_differ(tmp_path):
    state_b = tiny_state(1)
    del state_b["model.layers.1.mlp.gate_proj.weight"]
    state_b["model.layers.1.mlp.up_proj.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    dir_a = write_model(tmp_path / "a", tiny_state())
    dir_b = write_model(tmp_path / "b", state_b)
    with pytest.raises(CheckpointError) as err:
        next(iter_tensor_pairs(dir_a, dir_b))
    message = str(err.value)
    assert f"only in {dir_a}: model.layers.1.mlp.gate_proj.weight" in message
    assert f"only in {dir_b}: model.layers.1.mlp.up_proj.weight" in message


def test_shapes_differ(tmp_path):
    state_b = tiny_state(1)
    state_b["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(16, 9, dtype=torch.bfloat16)
    dir_a = write_model(tmp_path / "a", tiny_state())
    dir_b = write_model(tmp_path / "b", state_b)
    with pytest.raises(CheckpointError) as err:
        next(iter_tensor_pairs(dir_a, dir_b))
    message = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "[16, 8]" in message and "[16, 9]" in message
    assert str(dir_b / "model.safetensors") in message


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_non_finite_values(tmp_path, bad_value):
    state_b = tiny_state(1)
    state_b["model.layers.1.self_attn.q_proj.weight"][2, 3] = bad_value
    dir_a = write_model(tmp_path / "a", tiny_state())
    dir_b = write_model(tmp_path / "b", state_b, shards=2)
    with pytest.raises(CheckpointError) as err:
        list(iter_tensor_pairs(dir_a, dir_b))
    message = str(err.value)
    assert "model.layers.1.self_attn.q_proj.weight" in message and "non-finite" in message
    assert str(dir_b) in message and ".safetensors" in message


def test_sharded_index_problems(tmp_path):
    dir_a = write_model(tmp_path / "a", tiny_state())
    dir_b = write_model(tmp_path / "b", tiny_state(1), shards=2)
    index = json.loads((dir_b / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    (dir_b / shard).unlink()
    with pytest.raises(CheckpointError) as err:
        list(iter_tensor_pairs(dir_a, dir_b))
    assert str(dir_b / shard) in str(err.value) and "missing" in str(err.value)

    dir_c = write_model(tmp_path / "c", tiny_state(1), shards=2)
    index = json.loads((dir_c / "model.safetensors.index.json").read_text())
    wrong = index["weight_map"]["lm_head.weight"]
    other = next(s for s in index["weight_map"].values() if s != wrong)
    index["weight_map"]["lm_head.weight"] = other
    (dir_c / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        list(iter_tensor_pairs(dir_a, dir_c))
    assert "lm_head.weight" in str(err.value) and other in str(err.value)
