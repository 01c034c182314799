"""A character-level tokenizer for the tiny study, built locally (no hub access needed).

One token per character of printable ASCII (32..126) and "\\n", plus four special tokens:

    id 0 <pad>   id 1 <bos>   id 2 <eos>   id 3 <unk>   id 4 "\\n"   id 5 " "   ...   id 99 "~"

Conventions the rest of the package relies on:
- Encoding adds no special tokens (there is no post-processor): callers append
  `tok.eos_token_id` to training targets themselves, and stop generation on it.
- Padding is on the left, so a batch of prompts ends at the same position for generation.
- Special-token strings that occur in text ("<eos>" typed literally) are split into
  characters (`split_special_tokens=True`), so encode/decode round-trips any printable ASCII
  text exactly; characters outside the vocabulary become <unk>.
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opdgeom.io import atomic_dir

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
CHARACTERS = ["\n"] + [chr(code) for code in range(32, 127)]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer; identical ids on every machine, since nothing is learned."""
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS.values(), *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        **SPECIAL_TOKENS,
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> None:
    """Save so that `AutoTokenizer.from_pretrained(out_dir)` loads it, atomically."""
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
