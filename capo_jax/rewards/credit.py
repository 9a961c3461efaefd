"""CAPO credit assignment: outcomes and critic votes -> per-token rewards and advantages.

A pure `jax.numpy` function of fixed-shape arrays (jittable; the keyword options are static),
following CAPO_SPEC.md sections 1.5-1.7:

    w[i, s]   = vote over the M' valid critiques of row i (intersection / majority / union / average)
    R[i, t]   = W_whole * r_i - W_process * w[i, s(t)]       (no process term where s(t) = -1)
    A[i, t]   = (R[i, t] - mean_group) / (std_group + eps)     (population std; see `norm`)

Rewards and advantages are 0 outside the mask. A group whose valid token rewards are all equal
gets exactly zero advantages (no eps-amplified rounding noise); where the group's std is 0 but
token rewards still differ (group_seq with equal row means) the rewards are only centred.
Step indices >= S fold into S-1. norm: `group_token` statistics over all valid tokens of the
group; `group_seq` over the group's per-row mean rewards; `center` subtracts the token mean only.
`mode="grpo"` / `"genorm"` run the outcome-only baseline through the same code: per-response
reward r_i, z-score over the group's responses (each counted once; centring on their mean when
norm="center", Dr.GRPO style).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MODES", "NORMS", "VOTES", "compute_credits", "step_weights", "votes_from_verdicts"]

VOTES = ("intersection", "majority", "union", "average")
NORMS = ("group_token", "group_seq", "center")
MODES = ("capo", "grpo", "genorm")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")


def step_weights(votes: jax.Array, vote_valid: jax.Array, vote: str) -> tuple[jax.Array, jax.Array]:
    """Per-step wrongness weight w float32[B, S] in [0, 1] and M' int32[B] (valid critiques)."""
    _check_choice("vote", vote, VOTES)
    valid = vote_valid.astype(bool)
    m_valid = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
    n_s = jnp.sum(votes.astype(bool) & valid[:, :, None], axis=1).astype(jnp.int32)  # [B, S]
    mv = m_valid[:, None]
    if vote == "intersection":
        w = (n_s == mv).astype(jnp.float32)
    elif vote == "majority":
        w = (2 * n_s > mv).astype(jnp.float32)
    elif vote == "union":
        w = (n_s >= 1).astype(jnp.float32)
    else:
        w = n_s.astype(jnp.float32) / jnp.maximum(mv, 1).astype(jnp.float32)
    w = jnp.where(mv > 0, w, 0.0)  # no valid critique: no process penalty
    return w, m_valid


def _group_normalise(
    x: jax.Array, valid: jax.Array, group_size: int, norm: str, eps: float, per_row_mean: bool
) -> jax.Array:
    """Normalise x[B, T] within groups of `group_size` contiguous rows over valid entries."""
    b, t = x.shape
    g = group_size
    xg = x.reshape(b // g, g, t)
    vg = valid.reshape(b // g, g, t)
    big = jnp.float32(3.0e38)
    lo = jnp.min(jnp.where(vg, xg, big), axis=(1, 2), keepdims=True)
    hi = jnp.max(jnp.where(vg, xg, -big), axis=(1, 2), keepdims=True)
    has_spread = hi > lo  # False also for an empty group
    shift = jnp.where(has_spread, lo, 0.0)
    xs = jnp.where(vg, xg - shift, 0.0)  # shifted for accuracy; identical values become exact zeros
    if norm == "group_seq" or per_row_mean:
        row_n = jnp.sum(vg, axis=2, keepdims=True).astype(jnp.float32)  # [P, G, 1]
        row_has = row_n > 0
        row_mean = jnp.sum(xs, axis=2, keepdims=True) / jnp.maximum(row_n, 1.0)
        n_rows = jnp.maximum(jnp.sum(row_has, axis=1, keepdims=True).astype(jnp.float32), 1.0)
        mean = jnp.sum(jnp.where(row_has, row_mean, 0.0), axis=1, keepdims=True) / n_rows
        var = jnp.sum(jnp.where(row_has, (row_mean - mean) ** 2, 0.0), axis=1, keepdims=True) / n_rows
    else:
        n_tok = jnp.maximum(jnp.sum(vg, axis=(1, 2), keepdims=True).astype(jnp.float32), 1.0)
        mean = jnp.sum(xs, axis=(1, 2), keepdims=True) / n_tok
        var = jnp.sum(jnp.where(vg, (xs - mean) ** 2, 0.0), axis=(1, 2), keepdims=True) / n_tok
    centred = xs - mean
    std = jnp.sqrt(var)
    # std 0 with spread > 0 happens only in group_seq (rows with equal means): centre, do not blow up by 1/eps.
    out = centred if norm == "center" else centred / jnp.where(std > 0, std + eps, 1.0)
    out = jnp.where(vg & has_spread, out, 0.0)
    return out.reshape(b, t)


def compute_credits(
    outcome: jax.Array,
    votes: jax.Array,
    vote_valid: jax.Array,
    token_step: jax.Array,
    mask: jax.Array,
    *,
    group_size: int,
    vote: str = "majority",
    w_whole: float = 2.0,
    w_process: float = 1.0,
    norm: str = "group_token",
    eps: float = 1e-6,
    mode: str = "capo",
) -> dict[str, jax.Array]:
    """Per-token rewards and advantages (float32[B, T], 0 outside `mask`) plus diagnostics.

    outcome float[B]; votes bool[B, M, S]; vote_valid bool[B, M]; token_step int32[B, T] (-1 = no
    step); mask bool/float[B, T] (nonzero = valid token). Rows of a group are contiguous.
    """
    _check_choice("mode", mode, MODES)
    _check_choice("vote", vote, VOTES)
    _check_choice("norm", norm, NORMS)
    if outcome.ndim != 1:
        raise ValueError(f"outcome must be float[B], got shape {outcome.shape}")
    b = outcome.shape[0]
    if votes.ndim != 3 or votes.shape[0] != b:
        raise ValueError(f"votes must be bool[B={b}, M, S], got shape {votes.shape}")
    if vote_valid.shape != votes.shape[:2]:
        raise ValueError(f"vote_valid must be bool[B, M]={votes.shape[:2]}, got shape {vote_valid.shape}")
    if token_step.ndim != 2 or token_step.shape[0] != b or mask.shape != token_step.shape:
        raise ValueError(
            f"token_step and mask must both be [B={b}, T]; got {token_step.shape} and {mask.shape}"
        )
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch size {b} must be a positive multiple of group_size={group_size} (rows of a group contiguous)")
    s = votes.shape[2]
    valid = mask.astype(bool) if mask.dtype == jnp.bool_ else (mask != 0)
    r = outcome.astype(jnp.float32)

    if mode == "capo":
        w, m_valid = step_weights(votes, vote_valid, vote)
        in_step = token_step >= 0
        idx = jnp.clip(token_step, 0, s - 1).astype(jnp.int32)
        tok_w = jnp.where(in_step, jnp.take_along_axis(w, idx, axis=1), 0.0)  # [B, T]
        penalty = jnp.float32(w_process) * tok_w
        rewards = jnp.float32(w_whole) * r[:, None] - penalty
        rewards = jnp.where(valid, rewards, 0.0)
        advantages = _group_normalise(rewards, valid, group_size, norm, eps, per_row_mean=False)
        no_valid = m_valid == 0
        penalised = valid & (tok_w > 0)
    else:
        w = jnp.zeros((b, s), jnp.float32)
        m_valid = jnp.zeros((b,), jnp.int32)
        no_valid = jnp.zeros((b,), bool)
        penalised = jnp.zeros_like(valid)
        rewards = jnp.where(valid, r[:, None], 0.0)
        # Outcome-only: each response counts once (z-score over the group's responses).
        advantages = _group_normalise(rewards, valid, group_size, norm, eps, per_row_mean=True)

    n_valid = jnp.sum(valid)
    frac = jnp.sum(penalised) / jnp.maximum(n_valid, 1).astype(jnp.float32)
    row_n = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
    return {
        "rewards": rewards.astype(jnp.float32),
        "advantages": advantages.astype(jnp.float32),
        "step_wrong": w,
        "num_valid_critiques": m_valid,
        "no_valid_critique": no_valid,
        "penalized_token_frac": frac.astype(jnp.float32),
        "seq_reward": (jnp.sum(rewards, axis=1) / row_n).astype(jnp.float32),
    }


def votes_from_verdicts(
    verdicts: Sequence[Sequence[object]], num_rows: int, m: int, max_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Host helper: parsed verdicts (verdicts[b][j] a set of 0-based steps or INVALID) -> (votes, vote_valid).

    Rows with fewer than m verdicts leave the rest invalid; indices >= max_steps fold into the last step.
    """
    if len(verdicts) != num_rows:
        raise ValueError(f"got verdicts for {len(verdicts)} rows, expected num_rows={num_rows}")
    if m < 1 or max_steps < 1:
        raise ValueError(f"m and max_steps must be >= 1, got m={m}, max_steps={max_steps}")
    votes = np.zeros((num_rows, m, max_steps), bool)
    valid = np.zeros((num_rows, m), bool)
    for b, row in enumerate(verdicts):
        if len(row) > m:
            raise ValueError(f"row {b} has {len(row)} verdicts, more than m={m}")
        for j, v in enumerate(row):
            if not isinstance(v, (set, frozenset)):
                continue  # INVALID (or anything that is not a parsed set) carries no vote
            valid[b, j] = True
            for s in v:
                if int(s) >= 0:
                    votes[b, j, min(int(s), max_steps - 1)] = True
    return votes, valid
