"""HFEngine's decode loop (issue 28): token for token what transformers ``generate`` samples under the
same seed, with each distinct prompt prefilled once however many rows repeat it."""

import pytest
import torch

from opdgeom.models import build_model
from opdgeom.rollout import HFEngine
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.tokens import encode_prompt, left_pad

SPEC = {
    "architecture": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
}  # fmt: skip
# Different lengths (left padding, positions from the first real token), a one-token prompt (BOS only),
# and groups of 3 consecutive copies as a policy-gradient step samples them, plus a repeat out of order.
TEXTS = ["Q: 1+2=?\nA: ", "Q: 12*3-7=?\nA: ", "", "Q: 5=?\nA: "]


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer()
    model = build_model(SPEC, tok, seed=3).eval()
    prompts = [encode_prompt(tok, t) for t in TEXTS for _ in range(3)]
    return model, tok, prompts + [prompts[0]]


def reference(model, tok, prompts, max_new_tokens, temperature, seed, top_p=1.0, batch_size=256):
    """What HFEngine sampled before its own loop: ``generate`` per chunk, the global RNG seeded once."""
    torch.manual_seed(seed)
    eos, completions = tok.eos_token_id, []
    for start in range(0, len(prompts), batch_size):
        ids_BT, mask_BT = left_pad(prompts[start : start + batch_size], tok.pad_token_id)
        out_BS = model.generate(
            input_ids=ids_BT, attention_mask=mask_BT, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_k=0 if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None, pad_token_id=tok.pad_token_id, eos_token_id=eos,
        )  # fmt: skip
        for row in out_BS[:, ids_BT.shape[1] :].tolist():
            completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


@pytest.mark.parametrize(
    "temperature, top_p, batch_size",
    [(1.0, 1.0, 256), (0.7, 0.9, 256), (1.3, 1.0, 5), (0.0, 1.0, 256)],
    ids=["training", "nucleus", "chunked", "greedy"],
)
def test_the_engine_samples_exactly_what_generate_samples(tiny, temperature, top_p, batch_size):
    model, tok, prompts = tiny
    for seed in (0, 1):
        got = HFEngine(model, tok, batch_size=batch_size).sample(prompts, 24, temperature, seed, top_p=top_p)
        want = reference(model, tok, prompts, 24, temperature, seed, top_p, batch_size)
        assert got.completion_ids == want
        assert got.prompt_ids == prompts
    distinct = prompts[::3]  # no repeats: the prefill's cache serves the rows as it is
    got = HFEngine(model, tok, batch_size=batch_size).sample(distinct, 24, temperature, 2, top_p=top_p)
    assert got.completion_ids == reference(model, tok, distinct, 24, temperature, 2, top_p, batch_size)
    ends = [c[-1] == tok.eos_token_id for c in want]
    if temperature > 0:
        assert any(ends) and not all(ends)  # some rows stop at EOS, others run to the length limit


def test_each_distinct_prompt_is_prefilled_once(tiny):
    model, tok, prompts = tiny
    widths = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        HFEngine(model, tok).sample(prompts, 4, 1.0, seed=0)
    finally:
        hook.remove()
    longest = max(map(len, prompts))
    assert widths[0] == (len(TEXTS), longest)  # 13 rows, 4 distinct prompts
    assert all(w == (len(prompts), 1) for w in widths[1:]) and len(widths) <= 4


def test_the_engine_leaves_the_model_in_its_mode(tiny):
    model, tok, prompts = tiny
    model.train()
    try:
        HFEngine(model, tok).sample(prompts[:2], 3, 1.0, seed=0)
        assert model.training
    finally:
        model.eval()


def test_decoding_runs_in_inference_mode_except_on_an_fsdp_model(tiny, tmp_path):
    """inference_mode (no autograd bookkeeping) on a plain model; on an FSDP2 model plain no_grad, since
    its parameters are re-pointed at all-gathered buffers that later forwards with gradients reuse. After
    sampling, the FSDP model still trains."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from opdgeom.logprobs import token_logprobs

    model, tok, prompts = tiny
    modes = []
    record = lambda m, a: modes.append(torch.is_inference_mode_enabled())  # noqa: E731
    hook = model.register_forward_pre_hook(record)
    try:
        alone = HFEngine(model, tok).sample(prompts, 6, 1.0, seed=4)
    finally:
        hook.remove()
    assert modes and all(modes)
    assert not any(p.is_inference() for p in model.parameters())

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = build_model(SPEC, tok, seed=3)
        fully_shard(sharded)
        modes.clear()
        hook = sharded.register_forward_pre_hook(record)
        got = HFEngine(sharded, tok, synced=True).sample(prompts, 6, 1.0, seed=4)
        hook.remove()
        assert modes and not any(modes)
        assert got.completion_ids == alone.completion_ids
        ids_BT, mask_BT = left_pad(prompts[:2], tok.pad_token_id)
        token_logprobs(sharded, ids_BT, mask_BT).sum().backward()  # a forward with gradients after sampling
        assert all(p.grad is not None for p in sharded.parameters())
    finally:
        dist.destroy_process_group()
