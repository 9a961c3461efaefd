"""Verifier: answer extraction, a table of equivalent / non-equivalent answers, the hard timeout."""
from __future__ import annotations

import time

import numpy as np
import pytest

from capo_jax.rewards.verify import VerifierPool, extract_answer, extract_choice, is_correct, score


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2) as p:
        yield p


# (predicted answer, reference, equivalent?)
PAIRS = [
    ("0.5", r"\frac{1}{2}", True),
    ("1/2", r"\frac{1}{2}", True),
    (r"\frac12", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (r"3\sqrt{3}", r"\sqrt{27}", True),
    ("(0,1]", "(0, 1]", True),
    ("[0,1)", "(0,1]", False),
    (r"(-\infty, 3)", r"(-\infty,3)", True),
    (r"x \in [2, 5]", "[2,5]", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("1,2", "2,1", True),
    (r"5 \text{ cm}", "5", True),
    (r"\text{5 cm}", "5", True),
    (r"5 \mathrm{cm}", "5", True),
    (r"12\text{ dollars}", "12", True),
    (r"\$5", "5", True),
    (r"45^\circ", "45", True),
    (r"10\%", "10", True),
    ("1,000", "1000", True),
    ("x=3", "3", True),
    ("y=2x+1", "2x+1", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("2^{10}", "1024", True),
    ("3+2i", "2i+3", True),
    (r"2\pi", "6.28318530718", True),
    (r"\sqrt{2}", "1.41421356", True),
    (r"\infty", r"\infty", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    ("5.0", "5", True),
    ("-7", "-7", True),
    ("2", "3", False),
    ("-3", "3", False),
    ("12", "12.0001", False),
    (r"\frac{1}{3}", "0.333", False),
    (r"\pi", "3.14159", False),
    ("(1,2)", "(2,1)", False),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{2}", False),
    (r"\{1,2,3\}", r"\{1,2\}", False),
    ("x^2-1", "(x-1)^2", False),
    ("1001", "1000", False),
    (r"\text{five}", "5", False),
    ("4", r"\frac{8}{3}", False),
]


def test_table_has_forty_pairs():
    assert len(PAIRS) >= 40 and {eq for *_, eq in PAIRS} == {True, False}


def test_equivalence_table(pool):
    responses = [f"Some work.\n\nSo the result is $\\boxed{{{p}}}$." for p, _, _ in PAIRS]
    got = score(responses, [g for _, g, _ in PAIRS], pool=pool, timeout=20.0)
    want = np.array([eq for *_, eq in PAIRS], np.float32)
    bad = [(PAIRS[i][0], PAIRS[i][1], bool(want[i])) for i in np.flatnonzero(got != want)]
    assert not bad, f"misjudged (pred, gold, expected): {bad}"
    assert got.dtype == np.float32


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"so \boxed{\frac{1}{\sqrt{2}}} and finally \boxed{\{1, 2\}}.", r"\{1, 2\}"),
        (r"nested \boxed{\frac{a^{2}}{b_{1}}}", r"\frac{a^{2}}{b_{1}}"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("Thus the answer is 1,000.", "1,000"),
        ("The final answer is $\\frac{3}{4}$.", r"\frac{3}{4}"),
        (r"The answer is \boxed 7 really", "7"),
        (r"\boxed{\text{(B)}}", "(B)"),
        ("no answer here", None),
        (r"unbalanced \boxed{1 + {2", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_responses_and_references_in_other_forms(pool):
    responses = ["#### 72", "The answer is 1,000.", "I conclude \\boxed{0.5}", "nothing", "\\boxed{3}"]
    references = ["72", "1000", "\\boxed{\\frac12}", "4", ""]
    assert score(responses, references, pool=pool).tolist() == [1, 1, 1, 0, 0]


def test_choice_mode():
    responses = ["So the answer is (C).", r"\boxed{B}", "Answer: D. because", "I pick (A) ... no, (E)", "maybe c", r"\boxed{\text{(A)}}"]
    refs = ["C", "(B)", "D", "E", "C", "B"]
    assert score(responses, refs, answer_format="choice").tolist() == [1, 1, 1, 1, 0, 0]
    assert extract_choice("The answer is (J)") == "J"
    with pytest.raises(ValueError, match="answer_format"):
        score(["x"], ["y"], answer_format="mcq")
    with pytest.raises(ValueError, match="one reference per response"):
        score(["x"], [])


def test_pathological_input_times_out_to_zero_and_pool_recovers(pool):
    """9^(9^(9^9)) makes sympy compute forever in C: the item is killed at the deadline and scores 0."""
    restarts = pool.restarts
    t0 = time.monotonic()
    got = pool.map([(r"9^{9^{9^{9}}}", "1"), (r"\frac{2}{4}", "0.5")], timeout=2.0)
    assert got == [False, True]
    assert time.monotonic() - t0 < 10.0
    assert pool.timeouts >= 1 and pool.restarts == restarts + 1
    # The replacement worker answers normally.
    assert score([r"\boxed{\sqrt{4}}", r"\boxed{(10^{10^{10}})!}"], ["2", "3"], pool=pool, timeout=2.0).tolist() == [1, 0]


def test_is_correct_uses_the_default_pool():
    assert is_correct(r"Therefore \boxed{\dfrac{1}{2}}.", "0.5")
    assert not is_correct(r"Therefore \boxed{\dfrac{1}{3}}.", "0.5")
    assert is_correct("#### 42", "42") and not is_correct("#### 41", "42")
