"""The per-checkpoint NLL, reverse-KL and sampled-reward metrics against float64 hand computations."""

import pytest
import torch

from opdgeom.evaluate import KL_SEED, Teacher, checkpoint_metrics, reverse_kl_rows, sampled_metrics
from opdgeom.models import build_model, load_model, save_model
from opdgeom.rollout import HFEngine
from opdgeom.tasks.base import Example
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.tokens import PromptFormat, encode_completion, encode_prompt

SPEC = {
    "source": "build", "architecture": "qwen3", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
}  # fmt: skip


def hand_reverse_kl(student, teacher, prompts, completions) -> list[list[float]]:
    """Per row, per completion token: KL(pi_s || pi_t) over the vocabulary at the position predicting
    it, one row at a time, float64."""
    rows = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            ls = torch.log_softmax(student(ids).logits.double(), -1)[0]
            lt = torch.log_softmax(teacher(ids).logits.double(), -1)[0]
        positions = [len(p) + j - 1 for j in range(len(c))]  # the logits at pos predict token pos + 1
        rows.append([(ls[pos].exp() * (ls[pos] - lt[pos])).sum().item() for pos in positions])
    return rows


def test_reverse_kl_matches_float64_hand_computation():
    tok = build_char_tokenizer()
    student = build_model(SPEC, tok, seed=0).double().eval()
    teacher = build_model(SPEC, tok, seed=1).double().eval()
    prompts = [encode_prompt(tok, t) for t in ["Q: 1+2=?\nA: ", "Q: 9*9-3=?\nA: ", "Q: 4=?\nA: "]]
    completions = [encode_completion(tok, t) for t in ["1+2=3 #### 3", "81", "4;5*6=30 #### 30"]]
    # batches of 2 rows and chunks of 5 positions: both boundaries fall inside rows
    rows = reverse_kl_rows(student, teacher, prompts, completions, tok.pad_token_id, batch_size=2, chunk_tokens=5)
    expected = hand_reverse_kl(student, teacher, prompts, completions)
    assert [len(r) for r in rows] == [len(c) for c in completions]
    for got, want in zip(rows, expected):
        assert got.dtype == torch.float64
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
        assert (got > 0).all()  # two different models: a KL is positive at every position
    same = reverse_kl_rows(student, student, prompts, completions, tok.pad_token_id)
    assert max(r.abs().max().item() for r in same) < 1e-12


class _LengthTask:
    """A verifier that rewards completions of even length (varies from sample to sample)."""

    def verify(self, text: str, answer: str) -> float:
        return float(len(text) % 2 == 0)


def test_sampled_metrics_per_prompt_parts_match_a_float64_hand_computation():
    tok = build_char_tokenizer()
    student = build_model(SPEC, tok, seed=0).double().eval()
    teacher = build_model(SPEC, tok, seed=1).double().eval()
    examples = [Example(p, "", "0") for p in ["Q: 1+2=?\nA: ", "Q: 9*9-3=?\nA: ", "Q: 4=?\nA: "]]
    prompts = [encode_prompt(tok, e.prompt) for e in examples]
    samples = 3
    got = sampled_metrics(
        student, tok, Teacher(teacher, PromptFormat(tok, False)), _LengthTask(), examples, prompts, 12, 1.0, samples, 4
    )
    # the same draws, replayed: prompt i's samples are rows i*samples .. i*samples + samples - 1
    repeated = [p for p in prompts for _ in range(samples)]
    rollouts = HFEngine(student, tok, batch_size=4).sample(repeated, 12, 1.0, seed=KL_SEED)
    completions = rollouts.completion_ids
    for i in range(len(examples)):
        mine = completions[i * samples : (i + 1) * samples]
        n_tokens = sum(map(len, mine))
        kl_sum = sum(map(sum, hand_reverse_kl(student, teacher, [prompts[i]] * samples, mine)))
        assert got["kl_tokens_per_prompt"][i] == n_tokens
        assert abs(got["kl_sum_per_prompt"][i] - kl_sum) < 1e-10 * max(1.0, kl_sum)
        texts = tok.batch_decode(mine, skip_special_tokens=True)
        assert got["reward_per_prompt"][i] == sum(len(t) % 2 == 0 for t in texts) / samples
    everything = [kl for row in hand_reverse_kl(student, teacher, repeated, completions) for kl in row]
    assert abs(got["reverse_kl"] - sum(everything) / len(everything)) < 1e-10
    assert got["sampled_reward"] == sum(got["reward_per_prompt"]) / len(examples) and got["samples"] == samples
    assert 0 < got["sampled_reward"] < 1  # the length verifier varies, so the per-prompt parts are not all equal
    with pytest.raises(ValueError, match="samples must be >= 1"):
        sampled_metrics(student, tok, Teacher(teacher, PromptFormat(tok, False)), _LengthTask(), examples, prompts,
                        12, 1.0, 0, 4)  # fmt: skip


def test_held_out_nll_and_its_per_prompt_parts_match_a_float64_hand_computation(tmp_path):
    tok = build_char_tokenizer()
    save_model(build_model(SPEC, tok, seed=0), tok, tmp_path / "ckpt")
    examples = [Example("Q: 1+2=?\nA: ", "1+2=3 #### 3", "3"), Example("Q: 9*9=?\nA: ", "81", "81"),
                Example("Q: 4=?\nA: ", "4;5*6=30 #### 30", "30")]  # fmt: skip
    # batch size 2: the rows of a batch have different lengths, and a batch boundary falls between prompts
    got = checkpoint_metrics(tmp_path / "ckpt", examples, _LengthTask(), 6, 2)
    reference = load_model(tmp_path / "ckpt", dtype=torch.float64, device=torch.device("cpu")).eval()  # as saved
    sums, tokens = [], []
    for e in examples:
        p, c = encode_prompt(tok, e.prompt), encode_completion(tok, e.completion)
        with torch.no_grad():
            logp = torch.log_softmax(reference(torch.tensor([p + c])).logits, -1)[0]
        sums.append(-sum(logp[len(p) + j - 1, t].item() for j, t in enumerate(c)))
        tokens.append(len(c))
    assert got["nll_tokens_per_prompt"] == tokens
    # the checkpoint is evaluated in fp32 on CPU: float32 agreement with the float64 reference
    assert got["nll_sum_per_prompt"] == pytest.approx(sums, rel=1e-5)
    assert got["nll"] == pytest.approx(sum(sums) / sum(tokens), rel=1e-5)
    assert got["nll"] == pytest.approx(sum(got["nll_sum_per_prompt"]) / sum(tokens), rel=1e-12)
