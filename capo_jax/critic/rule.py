"""A rule critic that stands in for the LLM critic (GenPRM) on the synthetic arithmetic task only.

It reads the question, as an LLM judge would, and each step as one operation `a op b = c`, and
judges every step on its own: an operation step is right when it applies the question's next
operation to the previous step's written result and computes it correctly (a step that carries a
wrong earlier result but computes correctly from it is right; one that applies another operation,
or starts from another number, is wrong even when its arithmetic holds); a step it cannot read is
wrong; the `\\boxed{}` step is wrong unless it comes after all the operations and restates the
previous result. Without a readable question it checks the arithmetic alone. It
writes its verdict in the LLM critic's text format, read by the shared parser, and misjudges
each step with probability `misjudge_prob` so that voting over M critiques matters, as with a
real GenPRM. It never quotes the policy's text, so a response cannot forge a verdict line.
"""
from __future__ import annotations

import ast
import re
import time
from fractions import Fraction
from typing import Sequence

import numpy as np

from capo_jax.critic.base import CriticStats, CritiqueRequest
from capo_jax.data.arithmetic import exact_value

_NUM = r"-?\d{1,18}"
_STEP_RE = re.compile(rf"({_NUM})\s*([+\-*/x×÷])\s*({_NUM})\s*=\s*({_NUM})\.?")
_BOXED_STEP_RE = re.compile(rf"(?:The answer is\s*)?\\boxed\{{\s*({_NUM})\s*\}}\.?")
_BOXED_ANY_RE = re.compile(r"\\boxed\{\s*([^{}]{0,40}?)\s*\}")
_MAX_STEP_CHARS = 400


_OP_NAMES = {"x": "*", "×": "*", "÷": "/"}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def question_chain(question: str) -> tuple[int, tuple[tuple[str, int], ...]] | None:
    """The start value and operations of a `Compute ((a op b) op c) ...` question in the order they apply, or None
    when the question is not such a left-nested chain of integers."""
    m = re.search(r"Compute\s+(.{1,400}?)\.?\s*$", question.strip())
    if not m:
        return None
    try:
        node = ast.parse(m.group(1), mode="eval").body
    except SyntaxError:
        return None
    ops: list[tuple[str, int]] = []
    while isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        right = node.right
        if not (isinstance(right, ast.Constant) and type(right.value) is int):
            return None
        ops.append((_AST_OPS[type(node.op)], int(right.value)))
        node = node.left
    if not (ops and isinstance(node, ast.Constant) and type(node.value) is int):
        return None
    return int(node.value), tuple(reversed(ops))


def judge_steps(steps: Sequence[str], question: str | None = None) -> list[tuple[bool, str]]:
    """Judge every step on its own: (is_wrong, a short reason written only from parsed numbers). With a readable
    `question`, an operation step must also apply the question's next operation to the previous written result."""
    chain = question_chain(question) if question else None
    out: list[tuple[bool, str]] = []
    prev: int | None = chain[0] if chain else None
    done = 0  # operation steps so far
    for raw in steps:
        text = raw.strip()
        if len(text) > _MAX_STEP_CHARS:
            out.append((True, "the step is not a single operation"))
            prev = None
            continue
        m = _STEP_RE.fullmatch(text)
        if m:
            a, op, b, c = int(m.group(1)), _OP_NAMES.get(m.group(2), m.group(2)), int(m.group(3)), int(m.group(4))
            val = exact_value(a, op, b)
            if chain is not None and done >= len(chain[1]):
                out.append((True, f"the question has only {len(chain[1])} operations"))
            elif chain is not None and (op, b) != chain[1][done]:
                want = chain[1][done]
                out.append((True, f"this step applies {op} {b}; the question's next operation is {want[0]} {want[1]}"))
            elif chain is not None and prev is not None and a != prev:
                out.append((True, f"this step starts from {a}; the previous result is {prev}"))
            elif val is None:
                out.append((True, f"{a} {op} {b} is undefined"))
            elif val == c:
                out.append((False, f"{a} {op} {b} = {c} is computed correctly"))
            else:
                out.append((True, f"{a} {op} {b} is {_fmt(val)}, not {c}"))
            prev = c
            done += 1
            continue
        m = _BOXED_STEP_RE.fullmatch(text)
        if m:
            v = int(m.group(1))
            if chain is not None and done < len(chain[1]):
                out.append((True, f"the answer comes after {done} of the question's {len(chain[1])} operations"))
            elif prev is None:
                out.append((True, "the boxed answer does not follow from a previous result"))
            elif v == prev:
                out.append((False, f"the boxed answer {v} restates the previous result"))
            else:
                out.append((True, f"the boxed answer {v} does not restate the previous result {prev}"))
            continue
        out.append((True, "the step cannot be read as one operation `a op b = c`"))
        prev = None
    return out


def true_wrong_steps(steps: Sequence[str], question: str | None = None) -> frozenset[int]:
    """The TRUE wrong-step set (0-based) of a response's steps to `question`, for step-error metrics and critic
    precision/recall."""
    return frozenset(i for i, (wrong, _) in enumerate(judge_steps(steps, question)) if wrong)


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _final_answer(steps: Sequence[str]) -> str | None:
    found = _BOXED_ANY_RE.findall("".join(steps)[-20000:])
    return found[-1].strip() if found else None


def _solve_question(question: str) -> Fraction | None:
    """The exact value of a `Compute <expr>.` question, evaluated over +-*/ and integers only."""
    m = re.search(r"Compute\s+(.{1,400}?)\.?\s*$", question.strip())
    if not m:
        return None
    try:
        tree = ast.parse(m.group(1), mode="eval")
    except SyntaxError:
        return None

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise ValueError("not an arithmetic expression")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError):
        return None


def outcome_is_correct(request: CritiqueRequest) -> bool:
    """Is the response's last `\\boxed{}` equal to the reference (or, with none, to the question's value)?"""
    answer = _final_answer(request.steps)
    if answer is None or not re.fullmatch(_NUM, answer):
        return False
    if request.reference is not None:
        try:
            return Fraction(answer) == Fraction(request.reference.strip())
        except (ValueError, ZeroDivisionError):
            return answer == request.reference.strip()
    truth = _solve_question(request.question)
    return truth is not None and Fraction(answer) == truth


class RuleCritic:
    """The arithmetic demo's stand-in for the LLM critic: exact step checks, flipped with prob `misjudge_prob`."""

    def __init__(self, misjudge_prob: float = 0.0, index_base: int = 0):
        if not 0.0 <= misjudge_prob <= 1.0:
            raise ValueError(f"misjudge_prob must be in [0, 1], got {misjudge_prob}")
        if index_base not in (0, 1):
            raise ValueError(f"index_base must be 0 or 1, got {index_base}")
        self.misjudge_prob = float(misjudge_prob)
        self.index_base = int(index_base)
        self._stats = CriticStats()

    @property
    def last_stats(self) -> CriticStats:
        """Time of the most recent call (the rule critic spends no tokens: token counts are 0)."""
        return self._stats

    def _render(self, judged: list[tuple[bool, str]], flips: np.ndarray) -> str:
        lines, wrong = [], []
        for i, ((is_wrong, reason), flip) in enumerate(zip(judged, flips)):
            verdict = is_wrong != bool(flip)
            idx = i + self.index_base
            if verdict:
                wrong.append(idx)
            shown = reason if not flip else "on a second look, I judge this step the other way"
            lines.append(f"Step {idx}: {'incorrect' if verdict else 'correct'} ({shown}).")
        lines.append(f"Wrong step list: [{', '.join(str(i) for i in wrong)}]")
        return "\n".join(lines)

    def critique(
        self, requests: Sequence[CritiqueRequest], num_samples: int, rng: np.random.Generator
    ) -> list[list[str]]:
        """`num_samples` critiques per request, each ending with `Wrong step list: [...]`."""
        t0 = time.perf_counter()
        out = []
        for req in requests:
            judged = judge_steps(req.steps, req.question)
            flips = rng.random((num_samples, len(judged))) < self.misjudge_prob
            out.append([self._render(judged, flips[m]) for m in range(num_samples)])
        self._stats = CriticStats(seconds=time.perf_counter() - t0)
        return out

    def judge_outcome(
        self, requests: Sequence[CritiqueRequest], num_samples: int, rng: np.random.Generator
    ) -> list[list[str]]:
        """`num_samples` outcome judgements per request, each ending with `Final answer correct: yes|no`."""
        t0 = time.perf_counter()
        out = []
        for req in requests:
            correct = outcome_is_correct(req)
            flips = rng.random(num_samples) < self.misjudge_prob
            texts = []
            for flip in flips:
                says = correct != bool(flip)
                texts.append(
                    f"I compared the final boxed answer with the expected result.\n"
                    f"Final answer correct: {'yes' if says else 'no'}"
                )
            out.append(texts)
        self._stats = CriticStats(seconds=time.perf_counter() - t0)
        return out
