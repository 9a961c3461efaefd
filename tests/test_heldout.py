"""Held-out scoring of the arithmetic demo and the statistics of the comparison, against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from capo_jax.data.arithmetic import Problem
from capo_jax.demo.heldout import binomial_se, score_responses
from capo_jax.demo.stats import fmt_ci, fmt_p, mean_ci, paired_difference


def test_score_responses_counts_answers_and_true_wrong_steps():
    p = Problem(3, (("+", 4), ("*", 2)))  # 3 + 4 = 7, 7 * 2 = 14
    q = Problem(9, (("-", 5),))  # 9 - 5 = 4
    texts = [
        p.solution,  # right, no wrong step
        "3 + 4 = 8\n\n8 * 2 = 16\n\nThe answer is \\boxed{16}",  # wrong answer, 1 wrong step of 3
        "3 + 4 = 7\n\n7 * 2 = 15\n\nThe answer is \\boxed{14}",  # right answer, 2 wrong steps of 3 (15; boxed 14 != 15)
        "9 - 5 = 4\n\nThe answer is \\boxed{4}", "nonsense",  # right; unreadable (1 wrong step of 1)
        "9 - 5 = 4\n\nThe answer is \\boxed{5}",  # wrong: 1 wrong step of 2
    ]
    out = score_responses([p, q], texts, 3)
    assert out["pairs"] == 6
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["accuracy_se"] == pytest.approx(math.sqrt(0.25 / 6))
    assert out["step_error_rate"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 0 + 1 + 1 / 2) / 6)
    assert out["flawed_response_rate"] == pytest.approx(4 / 6)
    assert out["early_answer_rate"] == 0.0
    early = ["3 + 4 = 7\n\nThe answer is \\boxed{7}", "3 + 4 = 7\n\n7 * 2 = 14", "The answer is \\boxed{14}",
             "3 + 4 = 7\n\n7 * 2 = 14 The answer is \\boxed{14}"]
    # boxed after 1 of 2 operations; no box at all; boxed at once; the box shares the last equation's step (not early)
    out = score_responses([p], early, 4)
    assert out["early_answer_rate"] == pytest.approx(2 / 4) and out["accuracy"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="2 problems x 2 samples"):
        score_responses([p, q], texts, 2)
    assert math.isnan(binomial_se(0.5, 0)) and binomial_se(1.0, 10) == 0.0


def test_mean_ci_is_the_student_t_interval():
    x = [0.1, 0.4, 0.35, 0.2]
    s = mean_ci(x)
    half = sps.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.2625)
    assert (s["lo"], s["hi"]) == (pytest.approx(0.2625 - half), pytest.approx(0.2625 + half))
    assert mean_ci([0.5, None, float("nan")]) == {"n": 1, "mean": 0.5, "sd": None, "lo": None, "hi": None}
    assert mean_ci([])["mean"] is None
    assert fmt_ci(s) == f"0.263 [{0.2625 - half:.3f}, {0.2625 + half:.3f}]" and fmt_ci(mean_ci([])) == "n/a"


def test_paired_difference_matches_the_paired_t_test_over_common_seeds():
    a = {0: 0.6, 1: 0.55, 2: 0.7, 3: 0.62, 4: None}
    b = {0: 0.5, 1: 0.52, 2: 0.61, 3: 0.6, 5: 0.9}
    d = paired_difference(a, b)
    ref = sps.ttest_rel([0.6, 0.55, 0.7, 0.62], [0.5, 0.52, 0.61, 0.6])
    assert d["n"] == 4 and d["mean"] == pytest.approx(np.mean([0.1, 0.03, 0.09, 0.02]))
    assert d["p"] == pytest.approx(ref.pvalue)
    assert d["p_rank"] == pytest.approx(sps.wilcoxon([0.1, 0.03, 0.09, 0.02]).pvalue) and d["p_rank"] == pytest.approx(2 / 16)
    assert d["lo"] < d["mean"] < d["hi"]
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})["p"] == 0.0  # a constant non-zero difference
    assert paired_difference({0: 1.0}, {0: 0.0})["p"] is None
    assert fmt_p(0.0004) == "< 0.001" and fmt_p(0.0312) == "0.031" and fmt_p(None) == "n/a"
