"""Verdict parsing: the accepted forms, INVALID for everything else, and fuzzing."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_jax.critic import INVALID, parse_outcome_verdict, parse_verdict


@pytest.mark.parametrize(
    "critique, expected",
    [
        ("Step 0 ok.\nWrong step list: [1, 3]", {1, 3}),
        ("Wrong step list: []", set()),
        ("Wrong step list: [ ]", set()),
        ("wrong step list: none", set()),
        ("Wrong step list: None.", set()),
        ("WRONG STEP LIST:[2,3]", {2, 3}),
        ("**Wrong step list:** [0, 2]", {0, 2}),
        ("**Wrong step list**: [0]", {0}),
        ("Wrong steps list : Step 2", {2}),
        ("Wrong step list: [Step 1, Step 3]", {1, 3}),
        ("Wrong step list: Steps 1 and 3.", {1, 3}),
        ("Wrong step list: 1, 3", {1, 3}),
        ("Wrong step list: [1-3, 5]", {1, 2, 3, 5}),
        ("Wrong step list: [2 to 3]", {2, 3}),
        ("Wrong step list: (1; 2)", {1, 2}),
        ("Wrong step list: `[3]`", {3}),
        ("Wrong step list:\n[2]", {2}),
        ("Wrong step list: [1, 9, 99999999999999999999]", {1}),  # out of range dropped
        ("Wrong step list: [0-1000000000]", {0, 1, 2, 3, 4, 5}),  # a huge range is clipped, not expanded
        ("I first thought Wrong step list: [1]\nbut finally\nWrong step list: [2]", {2}),
        ("Wrong step list: [1]\nWrong step list: see above", INVALID),  # the last line decides
        ("Wrong step list: some of them", INVALID),
        ("Wrong step list: [1, x]", INVALID),
        ("Wrong step list: [-1]", INVALID),
        ("Wrong step list: [3-1]", INVALID),
        ("Wrong step list: [1, 2", INVALID),
        ("Wrong step list:", INVALID),
        ("The wrong steps are 1 and 3", INVALID),
        ("", INVALID),
    ],
)
def test_parse_verdict_forms(critique, expected):
    got = parse_verdict(critique, 6)
    if expected is INVALID:
        assert got is INVALID
    else:
        assert isinstance(got, frozenset) and got == frozenset(expected)


def test_index_base_one():
    assert parse_verdict("Wrong step list: [1, 3, 7]", 6, index_base=1) == frozenset({0, 2})
    assert parse_verdict("Wrong step list: [0]", 6, index_base=1) == frozenset()
    assert parse_verdict("Wrong step list: [0-2]", 6, index_base=1) == frozenset({0, 1})


def test_invalid_is_a_strict_singleton():
    assert repr(INVALID) == "INVALID" and copy.deepcopy(INVALID) is INVALID
    with pytest.raises(TypeError, match="is INVALID"):
        bool(INVALID)
    assert parse_verdict(None, 3) is INVALID  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "critique, expected",
    [
        ("Final answer correct: yes", True),
        ("Final answer correct: **No**.", False),
        ("final answer is correct: TRUE", True),
        ("**Final answer correct:** incorrect", False),
        ("Final answer correct: yes\n...\nFinal answer correct: no", False),
        ("Final answer correct: maybe", INVALID),
        ("The final answer looks correct.", INVALID),
    ],
)
def test_parse_outcome_verdict(critique, expected):
    assert parse_outcome_verdict(critique) is expected


_PIECES = st.sampled_from(
    ["Wrong step list:", "wrong  steps list :", "**", "[", "]", "(", ")", ",", ";", " ", "\n", "-", "–", "to",
     "and", "step", "Step", "none", "0", "1", "2", "7", "12", "999999999999", "x", ".", "：", "#", "`"]
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECES, max_size=14), st.integers(0, 8), st.sampled_from([0, 1]))
def test_fuzz_structured(pieces, num_steps, base):
    got = parse_verdict("".join(pieces), num_steps, index_base=base)
    assert got is INVALID or (isinstance(got, frozenset) and got <= frozenset(range(num_steps)))


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=80), st.integers(0, 8))
def test_fuzz_arbitrary_text(text, num_steps):
    for critique in (text, "Wrong step list: " + text, text + "\nWrong step list:" + text):
        got = parse_verdict(critique, num_steps)
        assert got is INVALID or (isinstance(got, frozenset) and got <= frozenset(range(num_steps)))
    assert parse_outcome_verdict("Final answer correct: " + text) in (True, False) or \
        parse_outcome_verdict("Final answer correct: " + text) is INVALID
