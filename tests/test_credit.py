"""compute_credits against a loop-based NumPy re-derivation of CAPO_SPEC.md 1.5-1.7, plus properties."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capo_jax.critic.parser import INVALID
from capo_jax.rewards.credit import NORMS, VOTES, compute_credits, votes_from_verdicts

W_WHOLE, W_PROCESS, EPS = 2.0, 1.0, 1e-6


# ----------------------------------------------------------------------------- reference


def ref_step_weight(votes_b, valid_b, s, vote):
    """w_s for one response, straight from the spec text."""
    m_prime = sum(1 for m in range(len(valid_b)) if valid_b[m])
    if m_prime == 0:
        return 0.0
    n_s = sum(1 for m in range(len(valid_b)) if valid_b[m] and votes_b[m][s])
    if vote == "intersection":
        return 1.0 if n_s == m_prime else 0.0
    if vote == "majority":
        return 1.0 if n_s > m_prime / 2 else 0.0
    if vote == "union":
        return 1.0 if n_s >= 1 else 0.0
    return n_s / m_prime


def ref_credits(outcome, votes, valid, token_step, mask, group_size, vote, norm, mode):
    """Loop-based rewards and advantages (population std; equal rewards -> 0; std 0 -> centre only)."""
    b, m, s_max = votes.shape
    t_len = token_step.shape[1]
    rewards = np.zeros((b, t_len))
    for i in range(b):
        w = [ref_step_weight(votes[i], valid[i], s, vote) for s in range(s_max)]
        for t in range(t_len):
            if not mask[i, t]:
                continue
            if mode != "capo":
                rewards[i, t] = outcome[i]
                continue
            st_ = token_step[i, t]
            pen = 0.0 if st_ < 0 else W_PROCESS * w[min(st_, s_max - 1)]
            rewards[i, t] = W_WHOLE * outcome[i] - pen
    adv = np.zeros_like(rewards)
    for g0 in range(0, b, group_size):
        rows = range(g0, g0 + group_size)
        toks = [rewards[i, t] for i in rows for t in range(t_len) if mask[i, t]]
        if not toks or max(toks) == min(toks):
            continue
        seqs = [np.mean([rewards[i, t] for t in range(t_len) if mask[i, t]]) for i in rows if mask[i].any()]
        if mode != "capo" or norm == "group_seq":
            mean, std = np.mean(seqs), np.std(seqs)
        else:
            mean, std = np.mean(toks), np.std(toks)
        for i in rows:
            for t in range(t_len):
                if mask[i, t]:
                    d = rewards[i, t] - mean
                    adv[i, t] = d if norm == "center" else (d / (std + EPS) if std > 0 else d)
    return rewards, adv


def random_batch(rng, p=2, g=4, m=4, s=6, t=16):
    b = p * g
    outcome = rng.integers(0, 2, b).astype(np.float32)
    votes = rng.random((b, m, s)) < 0.35
    valid = rng.random((b, m)) < 0.75
    valid[0] = False  # one row with no valid critique
    lengths = rng.integers(0, t + 1, b)
    lengths[1] = t
    mask = np.arange(t)[None, :] < lengths[:, None]
    token_step = np.where(mask, rng.integers(-1, s + 2, (b, t)), -1).astype(np.int32)  # includes >= S
    return outcome, votes, valid, token_step, mask, g


_jitted = functools.partial(
    jax.jit, static_argnames=("group_size", "vote", "w_whole", "w_process", "norm", "eps", "mode")
)(compute_credits)


def run(outcome, votes, valid, token_step, mask, g, vote, norm, mode="capo", jit=True):
    fn = _jitted if jit else compute_credits
    out = fn(
        jnp.asarray(outcome), jnp.asarray(votes), jnp.asarray(valid), jnp.asarray(token_step), jnp.asarray(mask),
        group_size=g, vote=vote, w_whole=W_WHOLE, w_process=W_PROCESS, norm=norm, eps=EPS, mode=mode,
    )
    return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("vote", VOTES)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_numpy_reference_capo(vote, norm):
    rng = np.random.default_rng(10 * VOTES.index(vote) + NORMS.index(norm))
    for _ in range(3):
        batch = random_batch(rng)
        out = run(*batch, vote, norm)
        r_ref, a_ref = ref_credits(*batch[:5], batch[5], vote, norm, "capo")
        np.testing.assert_allclose(out["rewards"], r_ref, atol=1e-5)
        np.testing.assert_allclose(out["advantages"], a_ref, atol=1e-4, rtol=1e-4)
        outcome, votes, valid, token_step, mask, _ = batch
        w_ref = [[ref_step_weight(votes[i], valid[i], s, vote) for s in range(votes.shape[2])] for i in range(len(outcome))]
        np.testing.assert_allclose(out["step_wrong"], w_ref, atol=1e-6)
        np.testing.assert_array_equal(out["no_valid_critique"], valid.sum(1) == 0)
        pen = sum(1 for i in range(len(outcome)) for t in range(mask.shape[1])
                  if mask[i, t] and token_step[i, t] >= 0 and w_ref[i][min(token_step[i, t], votes.shape[2] - 1)] > 0)
        assert out["penalized_token_frac"] == pytest.approx(pen / max(mask.sum(), 1), abs=1e-6)


@pytest.mark.parametrize("mode", ["grpo", "genorm"])
@pytest.mark.parametrize("norm", NORMS)
def test_outcome_only_modes_match_reference(mode, norm):
    rng = np.random.default_rng(7)
    batch = random_batch(rng)
    out = run(*batch, "majority", norm, mode=mode)
    r_ref, a_ref = ref_credits(*batch[:5], batch[5], "majority", norm, mode)
    np.testing.assert_allclose(out["rewards"], r_ref, atol=1e-6)
    np.testing.assert_allclose(out["advantages"], a_ref, atol=1e-4, rtol=1e-4)
    assert not out["step_wrong"].any() and out["penalized_token_frac"] == 0


def test_grpo_is_per_response_zscore():
    """Outcome-only: every valid token of response i carries (r_i - mean r) / (std r + eps), whatever its length."""
    outcome = np.array([1, 0, 0, 1], np.float32)
    lengths = np.array([3, 5, 1, 4])
    mask = np.arange(6)[None] < lengths[:, None]
    votes = np.ones((4, 2, 3), bool)
    out = run(outcome, votes, np.ones((4, 2), bool), np.zeros((4, 6), np.int32), mask, 4, "union", "group_token", mode="grpo")
    z = (outcome - outcome.mean()) / (outcome.std() + EPS)
    np.testing.assert_allclose(out["advantages"], np.where(mask, z[:, None], 0.0), atol=1e-5)


def test_spec_worked_example():
    """Lists [1,3], [1,2,3], [1,3], [2,3] vote to majority [1,3], intersection [3], union [1,2,3]."""
    verdicts = [[frozenset({1, 3}), frozenset({1, 2, 3}), frozenset({1, 3}), frozenset({2, 3})]]
    votes, valid = votes_from_verdicts(verdicts, 1, 4, 5)
    token_step = np.array([[0, 1, 2, 3, 4, -1]], np.int32)
    mask = np.ones((1, 6), bool)
    expect = {"majority": [0, 1, 0, 1, 0], "intersection": [0, 0, 0, 1, 0], "union": [0, 1, 1, 1, 0],
              "average": [0, 0.75, 0.5, 1.0, 0]}
    for vote, w in expect.items():
        out = run(np.array([1.0]), votes, valid, token_step, mask, 1, vote, "group_token")
        np.testing.assert_allclose(out["step_wrong"][0], w)
        np.testing.assert_allclose(out["rewards"][0], [2 - x for x in w] + [2.0])  # EOS-like token: no process term


def test_asymmetric_token_values():
    """+2 clean/correct, +1 flawed/correct, 0 clean/wrong, -1 flawed/wrong."""
    votes = np.zeros((2, 1, 2), bool)
    votes[:, 0, 1] = True
    out = run(np.array([1.0, 0.0]), votes, np.ones((2, 1), bool), np.array([[0, 1], [0, 1]], np.int32),
              np.ones((2, 2), bool), 2, "intersection", "group_token")
    np.testing.assert_allclose(out["rewards"], [[2, 1], [0, -1]])


def test_votes_from_verdicts_invalid_fold_and_errors():
    votes, valid = votes_from_verdicts([[INVALID, frozenset({0, 9})], [frozenset()]], 2, 3, 4)
    assert valid.tolist() == [[False, True, False], [True, False, False]]
    assert np.flatnonzero(votes[0, 1]).tolist() == [0, 3]  # 9 folds into the last step
    with pytest.raises(ValueError, match="num_rows"):
        votes_from_verdicts([[]], 2, 3, 4)
    with pytest.raises(ValueError, match="more than m"):
        votes_from_verdicts([[frozenset()] * 4], 1, 3, 4)


def test_bad_arguments_raise_clear_errors():
    batch = random_batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="vote='best'"):
        run(*batch[:5], batch[5], "best", "group_token", jit=False)
    with pytest.raises(ValueError, match="norm="):
        run(*batch[:5], batch[5], "union", "zscore", jit=False)
    with pytest.raises(ValueError, match="multiple of group_size"):
        run(*batch[:5], 5, "union", "group_token", jit=False)
    with pytest.raises(ValueError, match="mode="):
        run(*batch, "union", "group_token", mode="ppo", jit=False)


# ----------------------------------------------------------------------------- properties

_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw):
    """Fixed array shapes (one compilation per vote/norm, shared with the tests above); varied content."""
    p, g, m, s, t = 2, 4, 4, 6, 16
    b = p * g
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    m_used = draw(st.integers(1, m))
    s_used = draw(st.integers(1, s))
    outcome = rng.integers(0, 2, b).astype(np.float32)
    votes = rng.random((b, m, s)) < draw(st.floats(0, 1))
    valid = (rng.random((b, m)) < draw(st.floats(0, 1))) & (np.arange(m) < m_used)
    mask = rng.random((b, t)) < draw(st.floats(0.1, 1))
    token_step = rng.integers(-1, s_used, (b, t)).astype(np.int32)
    vote = draw(st.sampled_from(VOTES))
    norm = draw(st.sampled_from(NORMS))
    return outcome, votes, valid, token_step, mask, g, vote, norm


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_property_masked_zero_and_jit_matches_eager(batch):
    outcome, votes, valid, token_step, mask, g, vote, norm = batch
    jit_out = run(outcome, votes, valid, token_step, mask, g, vote, norm)
    eager = run(outcome, votes, valid, token_step, mask, g, vote, norm, jit=False)
    for key in ("rewards", "advantages"):
        assert np.all(jit_out[key][~mask] == 0)
        assert np.all(np.isfinite(jit_out[key]))
        np.testing.assert_allclose(jit_out[key], eager[key], atol=1e-5, rtol=1e-5)


@_SETTINGS
@given(batches())
def test_property_flagged_below_clean_within_correct_response(batch):
    outcome, votes, valid, token_step, mask, g, vote, norm = batch
    out = run(np.ones_like(outcome), votes, valid, token_step, mask, g, vote, norm)
    for i in range(len(outcome)):
        w = out["step_wrong"][i]
        flagged = mask[i] & (token_step[i] >= 0) & (w[np.clip(token_step[i], 0, None)] > 0)
        clean = mask[i] & ~flagged
        if flagged.any() and clean.any():
            assert out["advantages"][i][flagged].max() < out["advantages"][i][clean].min()


@_SETTINGS
@given(batches(), st.sampled_from([0.0, 1.0]))
def test_property_identical_rewards_give_zero_advantage(batch, r):
    outcome, votes, valid, token_step, mask, g, vote, norm = batch
    out = run(np.full_like(outcome, r), votes, np.zeros_like(valid), token_step, mask, g, vote, norm)
    assert np.all(out["advantages"] == 0.0)
    out = run(np.full_like(outcome, r), votes, valid, np.full_like(token_step, -1), mask, g, vote, norm)
    assert np.all(out["advantages"] == 0.0)


@_SETTINGS
@given(batches())
def test_property_all_correct_group_with_flags_has_signal(batch):
    """Where GRPO's signal is zero (all answers right), a flagged step still moves the advantages."""
    outcome, votes, valid, token_step, mask, g, vote, norm = batch
    ones = np.ones_like(outcome)
    out = run(ones, votes, valid, token_step, mask, g, vote, norm)
    grpo = run(ones, votes, valid, token_step, mask, g, vote, norm, mode="grpo")
    assert np.all(grpo["advantages"] == 0)
    for g0 in range(0, len(outcome), g):
        rows = slice(g0, g0 + g)
        vals = out["rewards"][rows][mask[rows]]
        if vals.size and vals.max() > vals.min():
            assert np.abs(out["advantages"][rows][mask[rows]]).max() > 0
