"""Reasoning steps: split a response on a delimiter and map each response token to its step.

Splitting rule: the text is cut after every occurrence of the delimiter (default the blank line
"\\n\\n"), so the delimiter belongs to the step before it. A segment with no content (empty or
ASCII whitespace only) is merged into the step before it (into the next step when it leads the
text), so the steps always concatenate back to the text; a text with no content has no steps.

Token rule: the work is done on bytes. Each token is decoded to the exact bytes it contributes
(through the tokenizer's byte-level vocabulary when it has one), the bytes are split with the
same rule, and a token belongs to the step that holds its FIRST byte. So a token straddling a
boundary (e.g. ".\\n\\nThe") goes to the earlier step, and a token holding only part of a UTF-8
character is placed by where that part starts. Tokens that contribute no bytes (special tokens
such as EOS) and padding get step -1. Steps past `max_steps` fold into the last one.
"""
from __future__ import annotations

import dataclasses
import json
import re
import weakref
from typing import Any, Sequence, TypeVar

import numpy as np

__all__ = [
    "BatchSteps",
    "StepMap",
    "batch_token_steps",
    "fold_steps",
    "response_steps",
    "split_steps",
    "token_bytes_table",
    "token_steps",
]

DEFAULT_DELIMITER = "\n\n"
_WS = " \t\n\r\x0b\x0c"
_S = TypeVar("_S", str, bytes)


def _split(text: _S, delimiter: _S) -> list[_S]:
    """The splitting rule on str or bytes alike (see the module docstring)."""
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string (the default is '\\n\\n')")
    empty = text[:0]
    ws = _WS if isinstance(text, str) else _WS.encode()
    parts = text.split(delimiter)
    steps: list[_S] = []
    carry = empty
    for k, part in enumerate(parts):
        piece = part + delimiter if k < len(parts) - 1 else part
        if not part.strip(ws):
            if steps:
                steps[-1] = steps[-1] + piece
            else:
                carry = carry + piece
        else:
            steps.append(carry + piece)
            carry = empty
    if not steps and carry.strip(ws):
        steps.append(carry)  # only delimiters, but not blank (e.g. ". " split on ". "): one step
    return steps


def split_steps(text: str, delimiter: str = DEFAULT_DELIMITER) -> list[str]:
    """Steps of a response; the delimiter stays at the end of the step before it."""
    return _split(text, delimiter)


def fold_steps(steps: Sequence[str], max_steps: int) -> tuple[list[str], int]:
    """Join steps past `max_steps` into the last one; returns (steps, number folded away)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = list(steps)
    if len(steps) <= max_steps:
        return steps, 0
    return steps[: max_steps - 1] + ["".join(steps[max_steps - 1 :])], len(steps) - max_steps


# ----------------------------------------------------------------------------- token bytes


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: b for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()
_FALLBACK_BYTE_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_TABLES: "weakref.WeakKeyDictionary[Any, list[bytes]]" = weakref.WeakKeyDictionary()
_TABLES_STRONG: dict[int, tuple[Any, list[bytes]]] = {}


def _backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    if type(tokenizer).__module__.startswith("tokenizers") and hasattr(tokenizer, "to_str"):
        return tokenizer
    return None


def _decoder_kinds(backend: Any) -> set[str]:
    """Types of the decoder(s) of a `tokenizers.Tokenizer`, e.g. {'ByteLevel'} or {'Replace','ByteFallback',...}."""
    spec = json.loads(backend.to_str()).get("decoder") or {}
    kinds, stack = set(), [spec]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            stack.extend(d.get("decoders") or [])
    return kinds


def _special_ids(tokenizer: Any, backend: Any | None) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    if backend is not None:
        for i, tok in backend.get_added_tokens_decoder().items():
            if tok.special:
                ids.add(int(i))
    return ids


def _build_table(tokenizer: Any) -> list[bytes]:
    backend = _backend(tokenizer)
    special = _special_ids(tokenizer, backend)
    if backend is not None:
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {int(i): t.content for i, t in backend.get_added_tokens_decoder().items()}
        kinds = _decoder_kinds(backend)
        size = max(max(vocab.values(), default=-1) + 1, len(tokenizer) if hasattr(tokenizer, "__len__") else 0)
        table = [b""] * size
        for piece, i in vocab.items():
            if i in special:
                continue
            if i in added:
                table[i] = added[i].encode("utf-8")
            elif "ByteLevel" in kinds:
                if all(c in _BYTE_OF_CHAR for c in piece):
                    table[i] = bytes(_BYTE_OF_CHAR[c] for c in piece)
                else:
                    table[i] = piece.encode("utf-8")
            elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
                m = _FALLBACK_BYTE_RE.match(piece)
                table[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
            else:
                table[i] = backend.decode([i], skip_special_tokens=False).encode("utf-8")
        return table
    # A tokenizer without a `tokenizers` backend: decode token by token (see `_token_bytes`).
    return []


def token_bytes_table(tokenizer: Any) -> list[bytes]:
    """Bytes each token id contributes to the text (b'' for special tokens); cached per tokenizer."""
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:
        table = None
    if table is None:
        hit = _TABLES_STRONG.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        table = _build_table(tokenizer)
        try:
            _TABLES[tokenizer] = table
        except TypeError:
            _TABLES_STRONG[id(tokenizer)] = (tokenizer, table)
    return table


def _token_bytes(token_ids: Sequence[int], tokenizer: Any) -> tuple[list[bytes], np.ndarray]:
    """Per-token bytes and each token's owner (itself, or the first token of its run).

    With no byte table, a run of tokens that only decodes cleanly as a whole (a split UTF-8
    character) gives all its bytes to its first token, which then owns the run's other tokens.
    """
    owner = np.arange(len(token_ids))
    table = token_bytes_table(tokenizer)
    if table:
        n = len(table)
        return [table[i] if 0 <= i < n else b"" for i in token_ids], owner
    special = _special_ids(tokenizer, None)
    out = [b""] * len(token_ids)
    run: list[int] = []
    run_start = 0
    for k, i in enumerate(token_ids):
        if i in special:
            continue
        if not run:
            run_start = k
        run.append(i)
        owner[k] = run_start
        text = tokenizer.decode(run, skip_special_tokens=True)
        if "\ufffd" in text and len(run) < 4:  # a UTF-8 character spans at most 4 tokens of one byte
            continue
        out[run_start] = text.encode("utf-8")
        run = []
    if run:
        out[run_start] = tokenizer.decode(run, skip_special_tokens=True).encode("utf-8")
    return out, owner


# ----------------------------------------------------------------------------- token -> step


@dataclasses.dataclass(frozen=True)
class StepMap:
    """One response: each token's step (-1 = none), the step texts, and how many steps were folded."""

    token_step: np.ndarray  # int32[T]
    steps: list[str]
    folded: int


def response_steps(
    token_ids: Sequence[int], tokenizer: Any, *, delimiter: str = DEFAULT_DELIMITER, max_steps: int = 64
) -> StepMap:
    """Steps of a tokenised response and the step of every token (rule in the module docstring)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    ids = [int(i) for i in token_ids]
    pieces, owner = _token_bytes(ids, tokenizer)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    text = b"".join(pieces)
    byte_steps = _split(text, delimiter.encode("utf-8"))
    token_step = np.full(len(ids), -1, np.int32)
    if byte_steps and len(ids):
        ends = np.cumsum([len(s) for s in byte_steps])
        starts = np.cumsum(lengths) - lengths
        idx = np.searchsorted(ends, starts, side="right")
        has_bytes = lengths > 0
        token_step = np.where(has_bytes, np.minimum(idx, max_steps - 1), -1).astype(np.int32)
        token_step = token_step[owner]  # members of a decoded run share their first token's step
    steps = [s.decode("utf-8", errors="replace") for s in byte_steps]
    steps, folded = fold_steps(steps, max_steps)
    return StepMap(token_step=token_step, steps=steps, folded=folded)


def token_steps(
    token_ids: Sequence[int], tokenizer: Any, *, delimiter: str = DEFAULT_DELIMITER, max_steps: int = 64
) -> tuple[np.ndarray, int]:
    """int32[T] step index of each token (-1 for none) and the number of steps folded into the last."""
    m = response_steps(token_ids, tokenizer, delimiter=delimiter, max_steps=max_steps)
    return m.token_step, m.folded


@dataclasses.dataclass(frozen=True)
class BatchSteps:
    """A batch for the trainer: token_step int32[B, T] (-1 padded), step texts per row, folds per row."""

    token_step: np.ndarray
    steps: list[list[str]]
    folded: np.ndarray  # int32[B]


def batch_token_steps(
    token_ids: np.ndarray | Sequence[Sequence[int]],
    tokenizer: Any,
    *,
    lengths: Sequence[int] | None = None,
    delimiter: str = DEFAULT_DELIMITER,
    max_steps: int = 64,
    width: int | None = None,
) -> BatchSteps:
    """`response_steps` for every row; row b uses its first `lengths[b]` tokens, the rest get -1."""
    rows = [list(map(int, r)) for r in token_ids]
    if lengths is not None:
        if len(lengths) != len(rows):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(rows)} rows")
        rows = [r[: int(n)] for r, n in zip(rows, lengths)]
    if width is None:
        width = max((len(r) for r in token_ids), default=0)
    out = np.full((len(rows), width), -1, np.int32)
    steps, folded = [], np.zeros(len(rows), np.int32)
    for b, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"row {b} has {len(r)} tokens, more than width={width}")
        m = response_steps(r, tokenizer, delimiter=delimiter, max_steps=max_steps)
        out[b, : len(r)] = m.token_step
        steps.append(m.steps)
        folded[b] = m.folded
    return BatchSteps(token_step=out, steps=steps, folded=folded)


def attach_unstepped_tokens(token_step: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give valid tokens outside any step (-1, e.g. EOS) the step of the nearest stepped token before them.

    Leading unstepped tokens take the row's first step; rows with no step are left as they are.
    This is the `reward.unstepped_tokens="nearest"` option: under the spec's default those tokens
    carry no process term, so in a group of flagged wrong answers an early EOS would score above
    every flagged token and the policy learns to stop short.
    """
    token_step = np.asarray(token_step)
    valid = np.asarray(mask).astype(bool)
    out = token_step.copy()
    for b in range(out.shape[0]):
        stepped = np.flatnonzero(valid[b] & (token_step[b] >= 0))
        if stepped.size == 0:
            continue
        positions = np.flatnonzero(valid[b] & (token_step[b] < 0))
        if positions.size == 0:
            continue
        before = np.searchsorted(stepped, positions, side="right") - 1
        source = stepped[np.maximum(before, 0)]
        out[b, positions] = token_step[b, source]
    return out
