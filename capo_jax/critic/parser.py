"""Read the critic's verdicts: `Wrong step list: [...]` (GenPRM) and `Final answer correct: yes|no` (GenORM).

Only the LAST verdict line of a critique counts (a critic may quote the format while reasoning).
Anything that cannot be read is the sentinel `INVALID`, never an exception: the vote then simply
has one critique fewer (M' in CAPO_SPEC.md 1.5).
"""
from __future__ import annotations

import re

__all__ = ["INVALID", "OUTCOME_PHRASE_RE", "VERDICT_PHRASE_RE", "parse_outcome_verdict", "parse_verdict"]


class _Invalid:
    """Singleton for an unreadable verdict; compare with `is INVALID` (truth-testing it is an error)."""

    _instance: "_Invalid | None" = None

    def __new__(cls) -> "_Invalid":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:
        raise TypeError("an INVALID verdict has no truth value; test it with `verdict is INVALID`")

    def __copy__(self) -> "_Invalid":
        return self

    def __deepcopy__(self, memo: dict) -> "_Invalid":
        return self


INVALID = _Invalid()

# Separators the parser tolerates inside the phrases: spaces, markdown emphasis.
_SEP = r"[\s*_]*"
VERDICT_PHRASE_RE = re.compile(rf"wrong{_SEP}steps?{_SEP}list", re.IGNORECASE)
OUTCOME_PHRASE_RE = re.compile(rf"final{_SEP}answer{_SEP}(?:is{_SEP})?correct", re.IGNORECASE)
_VERDICT_LINE_RE = re.compile(rf"{VERDICT_PHRASE_RE.pattern}{_SEP}[:：](?P<body>[^\n]*)", re.IGNORECASE)
_OUTCOME_LINE_RE = re.compile(rf"{OUTCOME_PHRASE_RE.pattern}{_SEP}[:：?](?P<body>[^\n]*)", re.IGNORECASE)

_NONE_WORDS = {"none", "no", "nothing", "n/a", "na", "null", "empty", "no wrong steps", "none of them", "no steps"}
_OPEN_CLOSE = {"[": "]", "(": ")", "{": "}"}
_RANGE_RE = re.compile(r"(\d+)\s*(?:-|–|—|\.\.|to)\s*(\d+)", re.IGNORECASE)
_ITEM_SPLIT_RE = re.compile(r"(?:[,;&\s]|\band\b)+", re.IGNORECASE)
_MAX_DIGITS = 9  # longer numbers are out of range anyway (and int() of huge strings is slow)


def _body_after(match: re.Match, text: str) -> str:
    """The verdict's body: the rest of its line, or the next non-blank line when that is empty."""
    body = match.group("body")
    if re.sub(r"[\s*_`]", "", body):
        return body
    for line in text[match.end() :].split("\n")[1:3]:
        if line.strip():
            return line
    return ""


def _list_content(body: str) -> str | None:
    """The list text inside optional brackets, markdown removed; None when the shape is wrong."""
    b = re.sub(r"[*`]", "", body).strip()
    if not b:
        return None
    if b[0] in _OPEN_CLOSE:
        close = b.find(_OPEN_CLOSE[b[0]])
        if close < 0:
            return None
        return b[1:close]
    return b.rstrip(".;").strip()


def parse_verdict(critique: str, num_steps: int, *, index_base: int = 0):
    """0-based wrong steps (frozenset) from the last `Wrong step list:` line, or INVALID.

    Accepts `[1, 3]`, `1, 3`, `[Step 1, Step 3]`, `Steps 1 and 3`, ranges `2-4`, `[]`, `none`, in
    any case, with markdown bold; indices outside the response's steps are dropped.
    """
    if not isinstance(critique, str):
        return INVALID
    matches = list(_VERDICT_LINE_RE.finditer(critique))
    if not matches:
        return INVALID
    content = _list_content(_body_after(matches[-1], critique))
    if content is None:
        return INVALID
    text = content.strip().rstrip(".").strip()
    if not text or text.lower() in _NONE_WORDS:
        return frozenset()
    text = re.sub(r"\bsteps?\b|#", " ", text, flags=re.IGNORECASE)
    text = _RANGE_RE.sub(r"\1-\2", text)
    lo, hi = index_base, index_base + num_steps - 1
    out: set[int] = set()
    items = [x for x in _ITEM_SPLIT_RE.split(text) if x]
    if not items:
        return INVALID
    for item in items:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            return INVALID
        a_txt, b_txt = m.group(1), m.group(2) or m.group(1)
        if len(a_txt) > _MAX_DIGITS or len(b_txt) > _MAX_DIGITS:
            if len(a_txt) > _MAX_DIGITS and len(b_txt) <= _MAX_DIGITS:
                return INVALID  # huge start before a small end: a reversed range
            if len(a_txt) <= _MAX_DIGITS:
                out.update(range(max(int(a_txt), lo), hi + 1))
            continue
        a, b = int(a_txt), int(b_txt)
        if a > b:
            return INVALID
        out.update(range(max(a, lo), min(b, hi) + 1))
    return frozenset(i - index_base for i in out)


_YES = {"yes", "true", "correct", "right", "y"}
_NO = {"no", "false", "incorrect", "wrong", "n"}


def parse_outcome_verdict(critique: str):
    """True / False from the last `Final answer correct: yes|no` line, or INVALID."""
    if not isinstance(critique, str):
        return INVALID
    matches = list(_OUTCOME_LINE_RE.finditer(critique))
    if not matches:
        return INVALID
    body = re.sub(r"[*`_\[\](){}\"']", " ", _body_after(matches[-1], critique)).strip().lower()
    word = re.match(r"[a-z]+", body)
    if word is None:
        return INVALID
    if word.group(0) in _YES:
        return True
    if word.group(0) in _NO:
        return False
    return INVALID
