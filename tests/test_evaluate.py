"""The per-checkpoint NLL, reverse-KL and sampled-reward metrics against float64 hand computations."""

import gc
import weakref

import pytest
import torch

import opdgeom.evaluate as evaluate
from opdgeom.evaluate import KL_SEED, EvalSettings, Teacher, checkpoint_metrics, reverse_kl_rows
from opdgeom.models import build_model, load_model, save_model
from opdgeom.rollout import HFEngine
from opdgeom.tasks.base import Example, Task
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

    verify_many = Task.verify_many


def _saved_pair(tmp_path, tok):
    save_model(build_model(SPEC, tok, seed=0), tok, tmp_path / "student", dtype=torch.float32)
    save_model(build_model(SPEC, tok, seed=1), tok, tmp_path / "teacher", dtype=torch.float32)
    cpu = torch.device("cpu")
    reference = [load_model(tmp_path / n, dtype=torch.float64, device=cpu).eval() for n in ("student", "teacher")]
    return reference


@pytest.mark.parametrize("teacher_resident", [True, False])
def test_sampled_metrics_per_prompt_parts_match_a_float64_hand_computation(tmp_path, teacher_resident):
    """The phased evaluation (decode, teacher alone, student alone) on float32 checkpoints against a
    float64 computation with both models at once; with the teacher loaded for its phase only (as on a
    GPU) or kept loaded (the CPU)."""
    tok = build_char_tokenizer()
    student64, teacher64 = _saved_pair(tmp_path, tok)
    examples = [Example(p, "", "0") for p in ["Q: 1+2=?\nA: ", "Q: 9*9-3=?\nA: ", "Q: 4=?\nA: "]]
    prompts = [encode_prompt(tok, e.prompt) for e in examples]
    samples = 3
    teacher = Teacher.at(tmp_path / "teacher", False, torch.device("cpu"))
    if not teacher_resident:
        teacher = Teacher(None, teacher.format, tmp_path / "teacher")
    settings = EvalSettings(max_new_tokens=12, batch_size=4, samples=samples, score_tokens=40)
    got = checkpoint_metrics(tmp_path / "student", examples, _LengthTask(), settings, teacher)
    # the same draws, replayed: prompt i's samples are rows i*samples .. i*samples + samples - 1
    repeated = [p for p in prompts for _ in range(samples)]
    student32 = load_model(tmp_path / "student", dtype=torch.float32, device=torch.device("cpu")).eval()
    completions = HFEngine(student32, tok, batch_size=4).sample(repeated, 12, 1.0, seed=KL_SEED).completion_ids
    for i in range(len(examples)):
        mine = completions[i * samples : (i + 1) * samples]
        n_tokens = sum(map(len, mine))
        kl_sum = sum(map(sum, hand_reverse_kl(student64, teacher64, [prompts[i]] * samples, mine)))
        assert got["kl_tokens_per_prompt"][i] == n_tokens
        assert got["kl_sum_per_prompt"][i] == pytest.approx(kl_sum, rel=1e-4)  # float32 models
        texts = tok.batch_decode(mine, skip_special_tokens=True)
        assert got["reward_per_prompt"][i] == sum(len(t) % 2 == 0 for t in texts) / samples
    everything = [kl for row in hand_reverse_kl(student64, teacher64, repeated, completions) for kl in row]
    assert got["reverse_kl"] == pytest.approx(sum(everything) / len(everything), rel=1e-4)
    assert got["sampled_reward"] == sum(got["reward_per_prompt"]) / len(examples) and got["samples"] == samples
    assert 0 < got["sampled_reward"] < 1  # the length verifier varies, so the per-prompt parts are not all equal
    with pytest.raises(ValueError, match="samples and k must be >= 1"):
        EvalSettings(12, 4, samples=0)


def test_avg_at_k_scores_each_problem_by_the_share_of_its_k_samples(tmp_path):
    tok = build_char_tokenizer()
    save_model(build_model(SPEC, tok, seed=0), tok, tmp_path / "ckpt", dtype=torch.float32)
    examples = [Example(p, "", "0") for p in ["Q: 1+2=?\nA: ", "Q: 9*9-3=?\nA: ", "Q: 4=?\nA: "]]
    settings = EvalSettings(10, 4, k=4, accuracy_temperature=0.7, top_p=0.9)
    got = checkpoint_metrics(tmp_path / "ckpt", examples, _LengthTask(), settings)
    model = load_model(tmp_path / "ckpt", dtype=torch.float32, device=torch.device("cpu")).eval()
    prompts = [encode_prompt(tok, e.prompt) for e in examples]
    replay = HFEngine(model, tok, batch_size=4).sample(
        [p for p in prompts for _ in range(4)], 10, 0.7, seed=evaluate.AVG_K_SEED, top_p=0.9
    )
    texts = tok.batch_decode(replay.completion_ids, skip_special_tokens=True)
    want = [sum(len(t) % 2 == 0 for t in texts[i * 4 : (i + 1) * 4]) / 4 for i in range(3)]
    assert got["correct"] == want and got["k"] == 4
    assert got["accuracy"] == pytest.approx(sum(want) / 3, abs=1e-15)
    assert any(0 < c < 1 for c in want)  # some problems are solved by some samples only
    with pytest.raises(ValueError, match="avg@k needs k > 1 with accuracy_temperature > 0"):
        EvalSettings(10, 4, k=4)


def test_a_teacher_loaded_for_its_phase_is_gone_before_the_student_loads(tmp_path, monkeypatch):
    """On a GPU the 32B teacher and the student must never be resident together (issue 27, defect 3):
    the teacher's phase ends with only its lm_head kept, before the student's phase loads the student."""
    tok = build_char_tokenizer()
    _saved_pair(tmp_path, tok)
    loaded, real_load = [], evaluate.load_model

    def recording_load(path, **kwargs):
        model = real_load(path, **kwargs)
        gc.collect()
        alive = [name for name, ref in loaded if ref() is not None]
        loaded.append((f"{path.name}", weakref.ref(model)))
        events.append((path.name, alive))
        return model

    events: list = []
    monkeypatch.setattr(evaluate, "load_model", recording_load)
    examples = [Example("Q: 1+2=?\nA: ", "3", "3"), Example("Q: 4=?\nA: ", "4", "4")]
    teacher = Teacher(None, PromptFormat(tok, False), tmp_path / "teacher")
    checkpoint_metrics(tmp_path / "student", examples, _LengthTask(), EvalSettings(6, 2, samples=2), teacher)
    # hf decoding loads the student; it is released for the teacher's phase, the teacher for the student's
    assert events == [("student", []), ("teacher", []), ("student", [])]


@pytest.mark.parametrize(
    "lengths, batch_size, max_tokens, want",
    [
        ([3, 3, 3, 3], 2, None, [(0, 2), (2, 4)]),
        ([3, 5, 2, 9, 1], 8, 10, [(0, 2), (2, 3), (3, 4), (4, 5)]),  # rows x longest <= 10; 9 alone
        ([20, 1], 4, 10, [(0, 1), (1, 2)]),  # a row over the budget still gets its own pass
    ],
)
def test_teacher_forced_passes_hold_their_token_budget(lengths, batch_size, max_tokens, want):
    got = evaluate._row_batches(lengths, batch_size, max_tokens)
    assert [(s.start, s.stop) for s in got] == want


def test_held_out_nll_and_its_per_prompt_parts_match_a_float64_hand_computation(tmp_path):
    tok = build_char_tokenizer()
    save_model(build_model(SPEC, tok, seed=0), tok, tmp_path / "ckpt")
    examples = [Example("Q: 1+2=?\nA: ", "1+2=3 #### 3", "3"), Example("Q: 9*9=?\nA: ", "81", "81"),
                Example("Q: 4=?\nA: ", "4;5*6=30 #### 30", "30")]  # fmt: skip
    # batch size 2: the rows of a batch have different lengths, and a batch boundary falls between prompts
    got = checkpoint_metrics(tmp_path / "ckpt", examples, _LengthTask(), EvalSettings(6, 2))
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
