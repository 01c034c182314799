"""The weight stream a colocated engine loads (rollout.weights): every parameter once, by its checkpoint
name, cast to the engine dtype, in buckets no larger than asked (beyond one oversized tensor). No vLLM
needed; the FSDP path (full_tensor per parameter on two ranks) is checked end to end by
tests/test_vllm_colocate.py, where every engine scores like the trainer after every sync."""

import torch

from opdgeom.models import build_model
from opdgeom.rollout.weights import iter_weights, weight_buckets
from opdgeom.tokenizer import build_char_tokenizer

SPEC = {
    "architecture": "qwen3", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip


def test_buckets_cover_every_parameter_once_in_the_engine_dtype():
    model = build_model(SPEC, build_char_tokenizer(), seed=0)
    params = dict(model.named_parameters())
    largest = max(p.numel() * 2 for p in params.values())
    limit = 40_000
    buckets = list(weight_buckets(model, torch.bfloat16, bucket_bytes=limit))
    assert len(buckets) > 1
    for bucket in buckets[:-1]:
        sizes = [t.numel() * t.element_size() for _, t in bucket]
        assert sum(sizes[:-1]) < limit <= sum(sizes) <= limit + largest  # closed by the tensor that filled it
    names = [name for bucket in buckets for name, _ in bucket]
    assert names == list(params)  # model order (layer by layer), tied lm_head not repeated
    for name, tensor in iter_weights(model, torch.bfloat16, bucket_bytes=limit):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, params[name].detach().to(torch.bfloat16))
    same = dict(iter_weights(model))  # no dtype: the parameters themselves, no copy
    assert all(same[n].data_ptr() == p.data_ptr() for n, p in params.items())
