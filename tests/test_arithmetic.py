"""The synthetic arithmetic world: determinism, correct reference solutions, the demo tokenizer."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_jax.data.arithmetic import ArithmeticWorld, format_prompt, world_config
from capo_jax.data.tokenizer import build_tokenizer, save_tokenizer


def _eval_question(question: str) -> int:
    """Independent reference: evaluate the question's expression with Python integer arithmetic."""
    expr = re.fullmatch(r"Compute (.*)\.", question).group(1)
    assert re.fullmatch(r"[0-9+\-*/() ]+", expr)
    return int(eval(expr.replace("/", "//")))  # noqa: S307 - digits and operators only, checked above


def test_problems_are_deterministic_per_seed():
    small = {"num_test": 10}
    a = [ArithmeticWorld(small, seed=3).problem(i) for i in range(50)]
    b = [ArithmeticWorld(small, seed=3).problem(i) for i in range(50)]
    c = [ArithmeticWorld(small, seed=4).problem(i) for i in range(50)]
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]


@pytest.mark.parametrize("ops", ["+-*", "+-*/", "+", "/*"])
def test_reference_solutions_are_correct(ops):
    world = ArithmeticWorld({"ops": ops, "min_ops": 1, "max_ops": 4, "max_value": 200, "max_operand": 12}, seed=1)
    for i in range(200):
        p = world.problem(i)
        assert int(p.answer) == _eval_question(p.question)
        assert 0 <= min(p.values) and max(p.values) <= 200
        assert set(op for op, _ in p.ops) <= set(ops)
        steps = p.solution.split("\n\n")
        assert len(steps) == len(p.ops) + 1
        v = p.start
        for step, (op, b) in zip(steps, p.ops):
            lhs, rhs = step.split(" = ")
            assert lhs == f"{v} {op} {b}"
            v = _eval_question(f"Compute {lhs}.")
            assert int(rhs) == v
        assert steps[-1] == f"The answer is \\boxed{{{p.answer}}}"


def test_reference_solutions_score_correct_under_the_verifier():
    from capo_jax.rewards.verify import is_correct

    world = ArithmeticWorld(seed=0)
    for i in range(20):
        p = world.problem(i)
        assert is_correct(p.solution, p.answer)
        assert not is_correct(p.solution, str(int(p.answer) + 1))


def test_test_split_is_held_out_of_training():
    world = ArithmeticWorld({"num_test": 100}, seed=0)
    test_q = {p.question for p in world.test_set()}
    assert len(test_q) == 100
    assert not test_q & {world.problem(i).question for i in range(2000)}


def test_noisy_solutions_carry_errors_forward():
    world = ArithmeticWorld(seed=0)
    rng = np.random.default_rng(0)
    n_wrong = 0
    for i in range(300):
        p = world.problem(i)
        text, wrong = p.noisy_solution(rng, 0.3, 2)
        steps = text.split("\n\n")
        n_wrong += len(wrong)
        prev = p.start
        for k, step in enumerate(steps[:-1]):
            lhs, rhs = step.split(" = ")
            assert lhs.split(" ")[0] == str(prev)  # carries the written result
            true = _eval_question(f"Compute {lhs}.")
            assert (int(rhs) != true) == (k in wrong)
            assert abs(int(rhs) - true) <= 2
            prev = int(rhs)
        assert steps[-1] == f"The answer is \\boxed{{{prev}}}"
    assert 0.2 < n_wrong / sum(len(world.problem(i).ops) for i in range(300)) < 0.4


def test_stop_short_solutions_box_the_intermediate_result_of_long_problems():
    from capo_jax.critic.rule import true_wrong_steps

    world = ArithmeticWorld(seed=0)
    problems = [world.problem(i) for i in range(400)]
    short = long_ = stopped = 0
    rng = np.random.default_rng(0)
    for p in problems:
        text, wrong = p.noisy_solution(rng, 0.2, 2, stop_short_prob=0.5, stop_short_ops=4)
        steps = text.split("\n\n")
        assert true_wrong_steps(steps, p.question) == wrong  # the generator's record is the rule critic's verdict
        if len(p.ops) < 4:
            short += 1
            assert len(steps) == len(p.ops) + 1  # short problems always finish
            continue
        long_ += 1
        if len(steps) == len(p.ops):  # stopped one operation early: every operation but the last, then the box
            stopped += 1
            assert len(p.ops) - 1 in wrong
            assert steps[-1] == f"The answer is \\boxed{{{steps[-2].split(' = ')[1]}}}"
        else:
            assert len(steps) == len(p.ops) + 1 and len(p.ops) not in wrong
    assert short > 100 and long_ > 100
    assert abs(stopped / long_ - 0.5) < 4 * np.sqrt(0.25 / long_)
    # problems shorter than stop_short_ops always finish, even when every long one would stop
    for p in problems[:50]:
        text, wrong = p.noisy_solution(np.random.default_rng(1), 0.0, 2, stop_short_prob=1.0, stop_short_ops=5)
        assert text == p.solution and not wrong


def test_bad_world_knobs_raise_naming_the_knob():
    with pytest.raises(ValueError, match="unknown arithmetic world knob 'max_opz'"):
        world_config({"max_opz": 3})
    with pytest.raises(ValueError, match="ops"):
        world_config({"ops": "+^"})
    with pytest.raises(ValueError, match="min_ops"):
        world_config({"min_ops": 4, "max_ops": 2})


def test_tokenizer_round_trips_every_problem_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    fresh = build_tokenizer()
    assert len(tok) == len(fresh)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    world = ArithmeticWorld({"ops": "+-*/", "max_ops": 5, "max_value": 999, "max_operand": 30, "num_test": 10}, seed=5)
    for i in range(60):
        p = world.problem(i)
        for text in (format_prompt(p.question), p.solution, format_prompt(p.question) + p.solution):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id
            assert tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == text
            assert fresh(text)["input_ids"] == ids
    assert tok.convert_ids_to_tokens(tok("The answer is \\boxed{7}")["input_ids"]) == [
        "<s>", "The answer is", " ", "\\boxed{", "7", "}"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.just("\n"), max_size=80))
def test_tokenizer_round_trips_any_printable_ascii(text):
    tok = _TOK
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


_TOK = build_tokenizer()
