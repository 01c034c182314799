"""Teacher scoring across prompt formats, on a Qwen3-style tokenizer built here: a base student
(raw text, ends with <|endoftext|>) and an instruct teacher (chat template, ends with <|im_end|>)
sharing one vocabulary."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opdgeom.logprobs import token_logprobs
from opdgeom.models import build_model, save_model
from opdgeom.tokens import encode_completion, encode_prompt, pack
from opdgeom.train.batches import TokenBatch
from opdgeom.train.distributed import SINGLE
from opdgeom.train.teacher import TeacherScorer

from conftest import TINY

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# The structure of Qwen3's template: turns in <|im_start|>role ... <|im_end|>; with enable_thinking
# false the generation prompt carries an empty think block.
QWEN3_STYLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen3_style_tokenizer(eos: str, chat_template: str | None) -> PreTrainedTokenizerFast:
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_style")
    student_tok = qwen3_style_tokenizer("<|endoftext|>", None)
    teacher_tok = qwen3_style_tokenizer("<|im_end|>", QWEN3_STYLE_TEMPLATE)
    teacher = build_model({**TINY, "architecture": "qwen3"}, teacher_tok, seed=1)
    save_model(teacher, teacher_tok, root / "teacher")
    return student_tok, teacher.double().eval(), root / "teacher"


def student_batch(student_tok, prompts, answers):
    prompt_ids = [encode_prompt(student_tok, p) for p in prompts]
    completion_ids = [encode_completion(student_tok, a) for a in answers]
    rows = pack(prompt_ids, completion_ids, student_tok.pad_token_id)
    batch = TokenBatch(rows["input_ids"], rows["attention_mask"], rows["target_mask"], torch.tensor(1.0))
    return prompt_ids, completion_ids, batch


def test_chat_teacher_scores_in_its_own_format_at_the_students_positions(pair):
    student_tok, teacher, teacher_dir = pair
    scorer = TeacherScorer(teacher, student_tok, teacher_dir, "chat", max_tokens=None, world=SINGLE)
    prompts, answers = ["2+3=?", "Add 10 and 7."], ["5", "The sum is 17."]
    prompt_ids, completion_ids, batch = student_batch(student_tok, prompts, answers)
    assert completion_ids[0][-1] == student_tok.convert_tokens_to_ids("<|endoftext|>")

    teacher_prompts, completions = scorer.teacher_rows(prompts, completion_ids)
    rendered = scorer.tokenizer.decode(teacher_prompts[0])
    assert rendered == "<|im_start|>user\n2+3=?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    im_end = student_tok.convert_tokens_to_ids("<|im_end|>")
    assert [c[-1] for c in completions] == [im_end, im_end]  # the student's EOS, read as the teacher's
    assert [c[:-1] for c in completions] == [c[:-1] for c in completion_ids]  # the same sampled tokens

    got_BT = scorer(prompts, prompt_ids, completion_ids, batch)
    for i, (teacher_prompt, completion) in enumerate(zip(teacher_prompts, completions)):
        ids = torch.tensor([teacher_prompt + completion])
        expected = token_logprobs(teacher, ids, torch.ones_like(ids))[0, len(teacher_prompt) - 1 :]
        start = len(prompt_ids[i]) - 1
        torch.testing.assert_close(got_BT[i, start : start + len(completion)].double(), expected, rtol=1e-6, atol=1e-6)
        assert got_BT[i, :start].abs().sum() == 0


def test_a_teacher_in_the_students_format_scores_the_students_rows(pair):
    student_tok, teacher, teacher_dir = pair
    raw_dir = teacher_dir.parent / "raw_teacher"
    save_model(teacher.float(), student_tok, raw_dir)
    scorer = TeacherScorer(teacher, student_tok, raw_dir, "raw", max_tokens=None, world=SINGLE)
    assert scorer.same_format
    prompt_ids, completion_ids, batch = student_batch(student_tok, ["1+1=?"], ["2"])
    got = scorer(["1+1=?"], prompt_ids, completion_ids, batch)
    full = token_logprobs(teacher, batch.input_ids_BT, batch.attention_mask_BT).float()
    completion_BT = batch.target_mask_BT.bool()
    # The completion positions exactly as a full pass scores them; the prompt's are not scored (zero).
    assert torch.equal(got[completion_BT], full[completion_BT]) and completion_BT.sum() == 2
    assert (got[~completion_BT] == 0).all()


def test_a_teacher_with_another_vocabulary_is_refused_by_name(pair, tmp_path):
    student_tok, teacher, _ = pair
    from opdgeom.tokenizer import build_char_tokenizer

    other = tmp_path / "other"
    char = build_char_tokenizer()
    save_model(build_model(TINY, char, seed=0), char, other)
    with pytest.raises(ValueError, match=f"{other}: the teacher's tokenizer differs from the student's"):
        TeacherScorer(teacher, student_tok, other, "chat", max_tokens=None, world=SINGLE)


def test_evaluations_reverse_kl_reads_a_chat_teacher_like_training_does(pair):
    """The held-out reverse KL (evaluate) and OPD's teacher scores (training) agree token for token."""
    from opdgeom.evaluate import completion_logprobs
    from opdgeom.tokens import PromptFormat

    student_tok, teacher, teacher_dir = pair
    prompts, answers = ["2+3=?", "Add 10 and 7."], ["5", "The sum is 17."]
    prompt_ids, completion_ids, batch = student_batch(student_tok, prompts, answers)
    scorer = TeacherScorer(teacher, student_tok, teacher_dir, "chat", max_tokens=None, world=SINGLE)
    trained_BT = scorer(prompts, prompt_ids, completion_ids, batch)
    fmt = PromptFormat(scorer.tokenizer, chat=True)
    rows = ([fmt.prompt(p) for p in prompts], [fmt.completion(c, student_tok.eos_token_id) for c in completion_ids])
    evaluated = completion_logprobs(teacher, *rows, pad_id=student_tok.pad_token_id, batch_size=8)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        torch.testing.assert_close(evaluated[i], trained_BT[i, len(p) - 1 : len(p) - 1 + len(c)], rtol=1e-6, atol=1e-6)


def test_a_raw_teacher_with_its_own_eos_reads_raw_prompts(pair):
    """Raw format but another EOS: the teacher reads the student's raw prompt, never its chat template."""
    student_tok, teacher, teacher_dir = pair
    scorer = TeacherScorer(teacher, student_tok, teacher_dir, "raw", max_tokens=None, world=SINGLE)
    assert not scorer.same_format
    prompt_ids, completion_ids, _ = student_batch(student_tok, ["2+3=?"], ["5"])
    teacher_prompts, completions = scorer.teacher_rows(["2+3=?"], completion_ids)
    assert teacher_prompts == prompt_ids
    assert completions[0][-1] == student_tok.convert_tokens_to_ids("<|im_end|>")
