"""The demo's character-level Hugging Face tokenizer, built with `tokenizers` and loadable by `AutoTokenizer`.

Every printable ASCII character and the newline is one token, every pair of digits too (so the world's
numbers up to 99 are single tokens and a step's arithmetic is one fact to recall, not a carry across
characters), and the template's few words (`Compute`, `The answer is`, `\\boxed{`), the spaced operators and the
step delimiter are single tokens, which keeps sequences short. The
`<s>` token is prepended to every encoded text; `</s>` ends a response; `<pad>` pads.
"""
from __future__ import annotations

import os
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORD_TOKENS = ("Compute", "The answer is", "\\boxed{", " + ", " - ", " * ", " / ", " = ", "\n\n")
DIGIT_PAIRS = tuple(f"{i:02d}" for i in range(100))  # a longer number splits into pairs from the left


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + WORD_TOKENS + tuple(chr(i) for i in range(32, 127)) + ("\n",) + DIGIT_PAIRS:
        vocab.setdefault(tok, len(vocab))
    return vocab


def build_tokenizer():
    """A fresh `PreTrainedTokenizerFast` for the arithmetic world (pad=0, bos=1, eos=2, unk=3)."""
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = "|".join(re.escape(w) for w in WORD_TOKENS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(words + r"|[0-9]{2}|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def save_tokenizer(out_dir: str):
    """Build the tokenizer and save it (`tokenizer.json` + `tokenizer_config.json`) in `out_dir`."""
    tok = build_tokenizer()
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
