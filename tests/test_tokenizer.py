"""Character tokenizer: exact round trips, fixed ids, conventions, save and reload."""

import string

import pytest
from transformers import AutoTokenizer

from opdgeom.tokenizer import build_char_tokenizer, save_tokenizer

PRINTABLE = "".join(chr(code) for code in range(32, 127)) + "\n"

TRICKY = [
    PRINTABLE,
    "",
    " ",
    "   leading and trailing   ",
    "\n\nQ: 7+3-4=?\nA: 7+3=10;10-4=6 #### 6\n",
    "a  b\n \n c",
    "can't won't ' \" ` don ' t , . ; :",
    "<eos><pad> <bos>x<unk>",
    "<<48/2=24>>24 ## ### ####",
    "##",
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_every_printable_character_is_its_own_token(tok):
    ids = tok.encode(PRINTABLE)
    assert len(set(ids)) == len(PRINTABLE)
    assert tok.unk_token_id not in ids
    for char in PRINTABLE:
        assert tok.convert_ids_to_tokens(tok.encode(char)) == [char]


def test_special_tokens_and_fixed_ids(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.encode("\n ~") == [4, 5, 99]
    assert len(tok) == 100
    assert tok.encode("é") == [tok.unk_token_id]


def test_encode_adds_no_special_tokens_and_decode_skips_them(tok):
    assert tok("ab")["input_ids"] == tok.encode("ab") == [tok.convert_tokens_to_ids(c) for c in "ab"]
    ids = [tok.bos_token_id, *tok.encode("A: 6"), tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "A: 6"


def test_padding_is_on_the_left(tok):
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0] == [tok.pad_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("a")]
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


def test_save_and_reload_offline_gives_identical_ids(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir = tmp_path / "tokenizer"
    save_tokenizer(tok, out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir)
    for text in TRICKY + [string.ascii_letters * 3]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 2, "left")


def test_save_replaces_existing_folder_and_leaves_no_temp(tok, tmp_path):
    out_dir = tmp_path / "tokenizer"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    save_tokenizer(tok, out_dir)
    save_tokenizer(tok, out_dir)
    assert not (out_dir / "stale.txt").exists()
    assert (out_dir / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
