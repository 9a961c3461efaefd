"""Step splitting and the token-to-step map, on a real byte-level BPE tokenizer trained here."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_jax.rewards.steps import (
    batch_token_steps,
    fold_steps,
    response_steps,
    split_steps,
    token_bytes_table,
    token_steps,
)

CORPUS = [
    "We add the numbers.\n\nThe sum is 12.\n\nSo the answer is 12.",
    "Le café coûte 3 € → 4 €.\n\nThe total is 7.\n\nDone 😀.",
    "First, x = 2.\n\nThen y = x + 1 = 3.\n\nThe answer is \\boxed{3}.",
    "Über naïve façade → résumé.\n\nThe end.",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE whose merges may cross whitespace, so '.\\n\\nThe' can become one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def reference_steps(text: str, ids: list[int], tokenizer) -> list[int]:
    """Independent map: each token's character offset (from the tokenizer's own encoding) -> step by char spans."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    assert enc.ids == ids
    bounds, pos = [], 0
    for s in split_steps(text):
        pos += len(s)
        bounds.append(pos)
    return [int(np.searchsorted(bounds, start, side="right")) for start, _ in enc.offsets]


TEXTS = [
    "We add the numbers.\n\nThe sum is 12.\n\nSo the answer is 12.",
    "Le café coûte 3 € → 4 €.\n\nDone 😀.\n\n\n\nThe total is 7 😀😀.",
    "\n\nFirst, x = 2.\n\n \n\nThen y = 3 →→ é.\n\n",
    "Über naïve 🙂 façade.\n\nThe end.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_steps_match_offsets_reference(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    got, folded = token_steps(ids, tokenizer, max_steps=64)
    assert folded == 0
    assert got.dtype == np.int32 and got.tolist() == reference_steps(text, ids, tokenizer)
    m = response_steps(ids, tokenizer)
    assert m.steps == split_steps(text) and "".join(m.steps) == text


def test_inputs_exercise_split_characters_and_fused_delimiters(tokenizer):
    """The test texts really contain tokens holding part of a UTF-8 character and tokens fusing '\\n\\n'."""
    table = token_bytes_table(tokenizer)
    partial, fused = 0, []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        steps, _ = token_steps(ids, tokenizer)
        for k, i in enumerate(ids):
            b = table[i]
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                partial += 1
            j = b.find(b"\n\n")
            if j >= 0 and b[j:].strip(b"\n"):
                fused.append((b, int(steps[k]), int(steps[k + 1]) if k + 1 < len(ids) else None))
    assert partial > 0
    assert fused, "expected a token that straddles a step boundary"
    for b, step, nxt in fused:  # first byte rule: the straddling token stays in the earlier step
        if b[:1] != b"\n":
            assert nxt is None or nxt == step + 1


def test_fused_token_goes_to_step_of_first_byte(tokenizer):
    text = "We add the numbers.\n\nThe sum is 12."
    ids = tokenizer.encode(text, add_special_tokens=False)
    table = token_bytes_table(tokenizer)
    steps, _ = token_steps(ids, tokenizer)
    k = next(k for k, i in enumerate(ids) if b"\n\nT" in table[i] or (b"\n\n" in table[i] and not table[i].startswith(b"\n")))
    assert steps[k] == 0 and steps[-1] == 1


def test_special_tokens_and_padding_get_minus_one(tokenizer):
    text = "A é.\n\nB → 😀."
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    got, _ = token_steps(ids, tokenizer)
    assert got[-1] == -1 and (got[:-1] >= 0).all()
    width = len(ids) + 5
    rows = [ids + [tokenizer.pad_token_id] * 5, ids[:3] + [tokenizer.pad_token_id] * (width - 3)]
    out = batch_token_steps(np.array(rows), tokenizer, lengths=[len(ids), 3], max_steps=8)
    assert out.token_step.shape == (2, width) and out.token_step.dtype == np.int32
    assert out.token_step[0, : len(ids)].tolist() == got.tolist()
    assert (out.token_step[0, len(ids):] == -1).all() and (out.token_step[1, 3:] == -1).all()
    assert out.steps[0] == split_steps(text) and out.folded.tolist() == [0, 0]


def test_max_steps_folds_into_last(tokenizer):
    text = "\n\n".join(f"Step {i} é" for i in range(7))
    ids = tokenizer.encode(text, add_special_tokens=False)
    full, _ = token_steps(ids, tokenizer, max_steps=64)
    got, folded = token_steps(ids, tokenizer, max_steps=3)
    assert folded == 4 and full.max() == 6
    assert got.tolist() == np.minimum(full, 2).tolist()
    m = response_steps(ids, tokenizer, max_steps=3)
    assert len(m.steps) == 3 and "".join(m.steps) == text


class DecodeOnly:
    """The real tokenizer seen only through `decode` (no byte table): exercises the fallback path."""

    def __init__(self, tok):
        self._tok = tok
        self.all_special_ids = tok.all_special_ids

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_only_fallback_agrees(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert token_steps(ids, DecodeOnly(tokenizer))[0].tolist() == token_steps(ids, tokenizer)[0].tolist()


def test_split_rules():
    assert split_steps("a\n\nb") == ["a\n\n", "b"]
    assert split_steps("a\n\n\n\nb\n\n") == ["a\n\n\n\n", "b\n\n"]
    assert split_steps("\n\na\n\n  \n\nb") == ["\n\na\n\n  \n\n", "b"]
    assert split_steps("") == [] and split_steps(" \n\n ") == []
    assert split_steps("x. y. z", delimiter=". ") == ["x. ", "y. ", "z"]
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("a", delimiter="")
    assert fold_steps(["a", "b", "c"], 2) == (["a", "bc"], 1)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t.é→")), max_size=40), st.sampled_from(["\n\n", "\n", ". "]))
def test_split_invariants(text, delim):
    steps = split_steps(text, delim)
    if text.strip(" \t\n\r\x0b\x0c"):
        assert "".join(steps) == text
    assert all(s.strip(" \t\n\r\x0b\x0c") for s in steps)
    assert all(s.endswith(delim) for s in steps[:-1])  # a step only ends at a delimiter
    assert all(split_steps(s, delim) == [s] for s in steps)  # no step hides a further boundary


def _nearest_reference(token_step, mask):
    """Loop re-derivation of reward.unstepped_tokens='nearest'."""
    out = [list(r) for r in token_step]
    for b, row in enumerate(token_step):
        steps_seen = [s for s, m in zip(row, mask[b]) if m and s >= 0]
        if not steps_seen:
            continue
        last = steps_seen[0]
        for t, (s, m) in enumerate(zip(row, mask[b])):
            if not m:
                continue
            if s >= 0:
                last = s
            else:
                out[b][t] = last
    return np.array(out, np.int32)


def test_attach_unstepped_tokens_fixed_case():
    from capo_jax.rewards.steps import attach_unstepped_tokens

    ts = np.array([[-1, 0, 0, 1, 1, -1, -1, -1], [-1, -1, -1, -1, -1, -1, -1, -1]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], bool)
    out = attach_unstepped_tokens(ts, mask)
    np.testing.assert_array_equal(out[0], [0, 0, 0, 1, 1, 1, -1, -1])  # EOS joins the last step; padding stays -1
    np.testing.assert_array_equal(out[1], ts[1])  # a row with no step is unchanged
    np.testing.assert_array_equal(ts[0], [-1, 0, 0, 1, 1, -1, -1, -1])  # input not modified


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(-1, 3), st.booleans()), min_size=6, max_size=6), min_size=1, max_size=4))
def test_attach_unstepped_tokens_matches_reference(rows):
    from capo_jax.rewards.steps import attach_unstepped_tokens

    ts = np.array([[s for s, _ in r] for r in rows], np.int32)
    mask = np.array([[m for _, m in r] for r in rows], bool)
    np.testing.assert_array_equal(attach_unstepped_tokens(ts, mask), _nearest_reference(ts, mask))
