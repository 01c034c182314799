"""The per-checkpoint reverse-KL metric against a float64 hand computation."""

import torch

from opdgeom.evaluate import reverse_kl_terms
from opdgeom.models import build_model
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.tokens import encode_completion, encode_prompt

SPEC = {
    "source": "build", "architecture": "qwen3", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
}  # fmt: skip


def hand_reverse_kl(student, teacher, prompts, completions) -> float:
    """Mean over every completion token of log pi_s(y_t) - log pi_t(y_t), one row at a time, float64."""
    diffs = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            ls = torch.log_softmax(student(ids).logits.double(), -1)[0]
            lt = torch.log_softmax(teacher(ids).logits.double(), -1)[0]
        for j, token in enumerate(c):
            pos = len(p) + j - 1  # the logits at pos predict token pos + 1
            diffs.append(ls[pos, token].item() - lt[pos, token].item())
    return sum(diffs) / len(diffs)


def test_reverse_kl_matches_float64_hand_computation():
    tok = build_char_tokenizer()
    student = build_model(SPEC, tok, seed=0).double().eval()
    teacher = build_model(SPEC, tok, seed=1).double().eval()
    prompts = [encode_prompt(tok, t) for t in ["Q: 1+2=?\nA: ", "Q: 9*9-3=?\nA: ", "Q: 4=?\nA: "]]
    completions = [encode_completion(tok, t) for t in ["1+2=3 #### 3", "81", "4;5*6=30 #### 30"]]
    terms = reverse_kl_terms(student, teacher, prompts, completions, tok.pad_token_id, batch_size=2)
    assert terms.numel() == sum(map(len, completions))
    expected = hand_reverse_kl(student, teacher, prompts, completions)
    assert abs(terms.double().mean().item() - expected) < 1e-5 * max(1.0, abs(expected))
    same = reverse_kl_terms(student, student, prompts, completions, tok.pad_token_id)
    assert torch.count_nonzero(same) == 0
