"""Held-out evaluation on the arithmetic world: answer accuracy and true wrong-step rate, sampled and greedy.

Sampled accuracy is what RL optimises (responses at the rollout temperature); greedy accuracy shows what
the policy knows. Each rate comes with its binomial standard error over the (problem, sample) pairs it
counts: for a fixed problem set that bounds the sampling noise from above, so two evaluations of one run
(the same problems, a fixed seed) that differ by several standard errors differ for real.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from capo_jax.data.arithmetic import DEFAULT_TEMPLATE, ArithmeticWorld, Problem, format_prompt
from capo_jax.data.templates import last_boxed


def binomial_se(p: float, n: int) -> float:
    """Standard error of a rate `p` measured on `n` independent trials (nan for n == 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def pair_scores(problems: Sequence[Problem], texts: Sequence[str], samples: int) -> dict[str, list]:
    """Per (problem, sample) pair, in order: whether the answer is right, the fraction of its steps that are wrong,
    whether any is, and whether it boxed an answer after fewer equations than the problem has operations (answered
    early)."""
    from capo_jax.critic.rule import true_wrong_steps
    from capo_jax.rewards.steps import split_steps

    if len(texts) != len(problems) * samples:
        raise ValueError(f"{len(texts)} responses for {len(problems)} problems x {samples} samples")
    correct, step_errors, flawed, early = [], [], [], []
    for i, text in enumerate(texts):
        problem = problems[i // samples]
        boxed = last_boxed(text)
        correct.append(boxed == problem.answer)
        steps = split_steps(text) or [text]
        wrong = true_wrong_steps(steps, problem.question)
        step_errors.append(len(wrong) / len(steps))
        flawed.append(bool(wrong))
        early.append(boxed is not None and sum("=" in step for step in steps) < len(problem.ops))
    return {"correct": correct, "step_errors": step_errors, "flawed": flawed, "early": early}


def score_responses(problems: Sequence[Problem], texts: Sequence[str], samples: int) -> dict[str, float]:
    """Accuracy, its standard error, and the true wrong-step rate of `samples` responses per problem (in order)."""
    return summarize(pair_scores(problems, texts, samples))


def summarize(pairs: dict[str, list]) -> dict[str, float]:
    """The rates (and the accuracy's standard error) of `pair_scores` output."""
    correct, step_errors, flawed, early = pairs["correct"], pairs["step_errors"], pairs["flawed"], pairs["early"]
    n = len(correct)
    acc = float(np.mean(correct)) if n else float("nan")
    return {"accuracy": acc, "accuracy_se": binomial_se(acc, n), "step_error_rate": float(np.mean(step_errors)) if n else float("nan"),
            "flawed_response_rate": float(np.mean(flawed)) if n else float("nan"),
            "early_answer_rate": float(np.mean(early)) if n else float("nan"), "pairs": n}


def evaluate_world(model: Any, tokenizer: Any, world: ArithmeticWorld, *, num_problems: int, samples: int,
                   temperature: float, max_new_tokens: int, greedy: bool = True, seed: int = 0,
                   template: str = DEFAULT_TEMPLATE, mesh: Any = None, rules: Any = None) -> dict[str, float]:
    """Score `model` on the world's first `num_problems` held-out problems: `samples` responses each at
    `temperature` (keys `sampled_*`) and, with `greedy`, one greedy response each (keys `greedy_*`).

    On several processes each samples and scores its share of the problems (`multihost.share`: by its block of
    `mesh`, or by process without one), each problem with the keys it has in the whole list, and all get the rates
    of every share together: the numbers one process would report."""
    from capo_jax import multihost
    from capo_jax.sampling import SamplingParams, generate_text

    problems = world.test_set()[:num_problems]
    if not problems:
        raise ValueError("the world's test split is empty: raise data.world.num_test")
    lo, hi = multihost.share(len(problems), mesh)
    mine = problems[lo:hi]
    prompts = [format_prompt(p.question, template) for p in mine]
    out: dict[str, float] = {"problems": float(len(problems))}
    runs = []
    if samples > 0:
        runs.append(("sampled", SamplingParams(n=samples, temperature=float(temperature), max_new_tokens=max_new_tokens), samples))
    if greedy:
        runs.append(("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens), 1))
    for name, params, n in runs:
        if prompts or multihost.spans_processes(mesh):  # a mesh over processes: every process takes part in each call
            texts = generate_text(model, tokenizer, prompts, params, seed, mesh, rules=rules,
                                  prompt_index=range(lo, hi)).texts
        else:
            texts = []
        pairs = multihost.gather_lists(pair_scores(mine, texts, n), mesh)
        out.update({f"{name}_{k}": float(v) for k, v in summarize(pairs).items()})
    return out
