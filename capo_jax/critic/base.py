"""The narrow interface every critic backend implements (Flax GenPRM, rule critic, remote server).

A backend turns a response's steps into M critique texts in the shared verdict format; the
parser (`capo_jax.critic.parse_verdict`) is the only reader of those texts, whichever backend
wrote them, so all backends are judged by the same rules.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class CritiqueRequest:
    """One response to judge: the question, its steps (already split), and the reference answer."""

    question: str
    steps: tuple[str, ...]
    reference: str | None = None


@dataclasses.dataclass
class CriticStats:
    """What a backend spent on one call, for the trainer's metrics."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


@runtime_checkable
class Critic(Protocol):
    """A critic backend: M critique texts per request, in the shared verdict format."""

    index_base: int

    def critique(
        self, requests: Sequence[CritiqueRequest], num_samples: int, rng: np.random.Generator
    ) -> list[list[str]]:
        """Judge every step of each request `num_samples` times; ends with a `Wrong step list:` line."""
        ...

    def judge_outcome(
        self, requests: Sequence[CritiqueRequest], num_samples: int, rng: np.random.Generator
    ) -> list[list[str]]:
        """Judge only the final answer (the `genorm` baseline); ends with a `Final answer correct:` line."""
        ...

    @property
    def last_stats(self) -> CriticStats:
        """Token counts and time of the most recent call."""
        ...
