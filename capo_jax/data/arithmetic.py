"""The synthetic arithmetic world of the embedded demo: seeded multi-step problems, one operation per step.

A problem is a chain `((a op1 b) op2 c) ...`; its reference solution writes one operation per
step (`12 + 7 = 19`, blank line, `19 * 3 = 57`, ..., `The answer is \\boxed{52}`), so steps,
the rule critic and the tokenizer all line up. Problem `i` of a split is a pure function of
(seed, split, i); the test split is held out of the training stream.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np

# The arithmetic world's knobs (config `data.world`, also the bootstrap's `world`).
WORLD_DEFAULTS: dict = {
    "min_ops": 2,  # fewest operations per problem (= arithmetic steps in the solution)
    "max_ops": 4,  # most operations per problem
    "min_operand": 1,  # smallest operand drawn
    "max_operand": 9,  # largest operand drawn
    "ops": "+-*",  # allowed operators, a subset of "+-*/" ("/" only where it divides exactly)
    "max_value": 50,  # every intermediate result stays in [0, max_value]
    "num_test": 200,  # size of the held-out test split (never drawn for training)
    "seed": 0,  # the world's seed: fixes the test split and the problem streams (the data seed picks a stream)
}

STEP_DELIMITER = "\n\n"
ANSWER_PREFIX = "The answer is "
DEFAULT_TEMPLATE = "{question}\n"  # the world's prompt: the question then a newline
_SPLIT_IDS = {"train": 0, "test": 1}
_MAX_TRIES = 100


@dataclasses.dataclass(frozen=True)
class Problem:
    """One chain problem: a start value and the operations applied to it in order."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def question(self) -> str:
        """The question text, e.g. `Compute ((12 + 7) * 3) - 5.`"""
        expr = str(self.start)
        for i, (op, b) in enumerate(self.ops):
            expr = f"({expr} {op} {b})" if i < len(self.ops) - 1 else f"{expr} {op} {b}"
        return f"Compute {expr}."

    @property
    def values(self) -> tuple[int, ...]:
        """The exact intermediate results, one per operation."""
        out, v = [], self.start
        for op, b in self.ops:
            v = apply_op(v, op, b)
            out.append(v)
        return tuple(out)

    @property
    def answer(self) -> str:
        """The reference answer as text."""
        return str(self.values[-1])

    @property
    def solution(self) -> str:
        """The correct reference solution, one operation per step."""
        return self.solution_with(self.values)

    def solution_with(self, written: Sequence[int]) -> str:
        """A solution that writes `written[i]` as step i's result, carrying it into step i+1."""
        steps, v = [], self.start
        for (op, b), r in zip(self.ops, written):
            steps.append(f"{v} {op} {b} = {r}")
            v = r
        steps.append(f"{ANSWER_PREFIX}\\boxed{{{v}}}")
        return STEP_DELIMITER.join(steps)

    def noisy_solution(self, rng: np.random.Generator, noise_prob: float, noise_max: int, stop_short_prob: float = 0.0,
                       stop_short_ops: int = 4) -> tuple[str, frozenset[int]]:
        """A solution whose step results are off by 1..noise_max with probability noise_prob each.

        Later steps compute correctly from the written (possibly wrong) earlier result, like a
        weak model would. With probability stop_short_prob, a problem of at least stop_short_ops
        operations stops one operation early and boxes that intermediate result (a premature
        answer). Returns the text and the set of wrong steps: those whose own arithmetic is wrong,
        and the boxed step when it comes too early.
        """
        written, wrong, v = [], set(), self.start
        for i, (op, b) in enumerate(self.ops):
            r = apply_op(v, op, b)
            if noise_prob > 0 and rng.random() < noise_prob:
                deltas = [d for k in range(1, noise_max + 1) for d in (k, -k)]
                ok = [d for d in deltas if r + d >= 0 and _chain_is_integral(r + d, self.ops[i + 1:])]
                if ok:
                    r = r + ok[int(rng.integers(len(ok)))]
                    wrong.add(i)
            written.append(r)
            v = r
        if stop_short_prob > 0 and len(self.ops) >= stop_short_ops and rng.random() < stop_short_prob:
            k = len(self.ops) - 1  # the boxed step takes the place of the last operation
            return Problem(self.start, self.ops[:k]).solution_with(written[:k]), frozenset({i for i in wrong if i < k} | {k})
        return self.solution_with(written), frozenset(wrong)


def apply_op(a: int, op: str, b: int) -> int:
    """`a op b` for the world's integer operators; `/` must divide exactly."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} does not divide exactly")
        return a // b
    raise ValueError(f"unknown operator {op!r}; the world knows + - * /")


def exact_value(a: int, op: str, b: int) -> Fraction | None:
    """The exact rational value of `a op b` (None for division by zero or an unknown operator)."""
    fa, fb = Fraction(a), Fraction(b)
    if op == "+":
        return fa + fb
    if op == "-":
        return fa - fb
    if op in ("*", "x", "×"):
        return fa * fb
    if op in ("/", "÷"):
        return None if b == 0 else fa / fb
    return None


def _chain_is_integral(v: int, ops: Sequence[tuple[str, int]]) -> bool:
    for op, b in ops:
        val = exact_value(v, op, b)
        if val is None or val.denominator != 1 or val < 0:
            return False
        v = int(val)
    return True


def world_config(world: Mapping[str, Any] | None = None) -> dict:
    """The world's knobs with defaults filled in, checked; unknown keys raise naming the key."""
    cfg = dict(WORLD_DEFAULTS)
    for key, value in dict(world or {}).items():
        if key not in WORLD_DEFAULTS:
            raise ValueError(f"unknown arithmetic world knob {key!r}; known: {sorted(WORLD_DEFAULTS)}")
        cfg[key] = value
    if not 1 <= cfg["min_ops"] <= cfg["max_ops"]:
        raise ValueError(f"world needs 1 <= min_ops <= max_ops, got {cfg['min_ops']}, {cfg['max_ops']}")
    if not 0 <= cfg["min_operand"] <= cfg["max_operand"] <= cfg["max_value"]:
        raise ValueError("world needs 0 <= min_operand <= max_operand <= max_value; fix those knobs")
    if not cfg["ops"] or set(cfg["ops"]) - set("+-*/"):
        raise ValueError(f"world ops must be a non-empty subset of '+-*/', got {cfg['ops']!r}")
    if int(cfg["num_test"]) < 0:
        raise ValueError("world num_test must be >= 0")
    return cfg


class ArithmeticWorld:
    """Seeded problem generator: `problem(i, split, stream)` is a pure function of (world seed, split, stream, i).

    `seed` overrides the world knob `seed` when given.
    """

    def __init__(self, world: Mapping[str, Any] | None = None, seed: int | None = None):
        self.cfg = world_config(world)
        self.seed = int(self.cfg["seed"] if seed is None else seed)
        self._test: tuple[Problem, ...] | None = None
        self._test_questions: frozenset[str] | None = None

    def _draw(self, rng: np.random.Generator) -> Problem | None:
        c = self.cfg
        lo, hi, top = int(c["min_operand"]), int(c["max_operand"]), int(c["max_value"])
        n_ops = int(rng.integers(c["min_ops"], c["max_ops"] + 1))
        v = int(rng.integers(lo, hi + 1))
        start, ops = v, []
        for _ in range(n_ops):
            choices = []
            for op in c["ops"]:
                if op == "+":
                    cand = range(lo, min(hi, top - v) + 1)
                elif op == "-":
                    cand = range(lo, min(hi, v) + 1)
                elif op == "*":
                    cand = range(lo, (min(hi, top // v) if v else hi) + 1)
                else:
                    cand = [b for b in range(max(lo, 1), hi + 1) if v % b == 0]
                if len(cand):
                    choices.append((op, cand))
            if not choices:
                return None
            op, cand = choices[int(rng.integers(len(choices)))]
            b = int(cand[int(rng.integers(len(cand)))])
            ops.append((op, b))
            v = apply_op(v, op, b)
        return Problem(start, tuple(ops))

    def _generate(self, split: str, index: int, stream: int = 0) -> Problem:
        if split not in _SPLIT_IDS:
            raise ValueError(f"arithmetic split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[split], int(stream), int(index)])
        for _ in range(_MAX_TRIES):
            p = self._draw(rng)
            if p is not None:
                return p
        raise ValueError(f"the world's knobs leave no valid problem ({self.cfg}); widen ops, operands or max_value")

    def test_set(self) -> tuple[Problem, ...]:
        """The held-out test problems (num_test of them, duplicates removed)."""
        if self._test is None:
            seen, out, i = set(), [], 0
            while len(out) < int(self.cfg["num_test"]) and i < 50 * int(self.cfg["num_test"]) + 100:
                p = self._generate("test", i)
                i += 1
                if p.question not in seen:
                    seen.add(p.question)
                    out.append(p)
            self._test, self._test_questions = tuple(out), frozenset(seen)
        return self._test

    def problem(self, index: int, split: str = "train", stream: int = 0) -> Problem:
        """Problem `index` of a split (training: of stream `stream`); training problems never repeat a test question."""
        if split == "test":
            return self.test_set()[index]
        self.test_set()
        for attempt in range(_MAX_TRIES):
            p = self._generate(split, int(index) + attempt * (1 << 40), stream)
            if p.question not in self._test_questions:
                return p
        raise ValueError("the world is too small: every training draw is a test question; widen the knobs or lower num_test")


def format_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The world's prompt for a question."""
    return template.format(question=question)
