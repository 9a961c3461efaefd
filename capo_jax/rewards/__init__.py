"""Rewards: the rule verifier (`verify`), step segmentation (`steps`) and the credit function (`credit`).

Submodules load on first access so that host-only users (e.g. verifier worker processes) never
import jax.
"""
from __future__ import annotations

import importlib

__all__ = ["credit", "steps", "verify"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
