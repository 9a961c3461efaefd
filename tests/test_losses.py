"""The PPO-clip loss, KL estimators and aggregations against a NumPy re-derivation on fixed inputs."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from capo_jax.rl import losses


def _inputs(seed=0, B=5, T=7):
    r = np.random.default_rng(seed)
    logp = r.normal(-1.5, 0.6, (B, T)).astype(np.float32)
    old = (logp + r.normal(0, 0.35, (B, T))).astype(np.float32)  # ratios well outside [0.8, 1.2] on both sides
    ref = (logp + r.normal(0, 0.5, (B, T))).astype(np.float32)
    adv = r.normal(0, 1, (B, T)).astype(np.float32)
    lengths = np.resize(np.array([7, 3, 1, 5, 0]), B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, ref, adv, mask


def _np_loss(logp, old, ref, adv, mask, agg, clip_low, clip_high, beta, est):
    """Loop-by-loop re-derivation of the spec's loss."""
    B, T = logp.shape
    per = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            rho = np.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            surrogate = min(rho * a, min(max(rho, 1 - clip_low), 1 + clip_high) * a)
            lr = float(ref[b, t]) - float(logp[b, t])
            kl = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": np.exp(lr) - 1 - lr}[est]
            per[b, t] = -surrogate + beta * kl
    seqs = [b for b in range(B) if mask[b].sum() > 0]
    if agg == "token_mean":
        return float((per * mask).sum() / mask.sum())
    if agg == "seq_mean_token_mean":
        return float(np.mean([(per[b] * mask[b]).sum() / mask[b].sum() for b in seqs]))
    if agg == "seq_mean_token_sum_norm":
        return float(np.mean([(per[b] * mask[b]).sum() / T for b in seqs]))
    raise AssertionError(agg)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_loss_matches_numpy(agg, est):
    logp, old, ref, adv, mask = _inputs()
    denoms = losses.minibatch_denominators(jnp.asarray(mask))
    loss, stats = losses.policy_loss(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), denoms,
        agg=agg, clip_low=0.2, clip_high=0.28, ref_logp=jnp.asarray(ref), kl_coef=0.1, kl_estimator=est,
    )
    want = _np_loss(logp, old, ref, adv, mask, agg, 0.2, 0.28, 0.1, est)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


def test_clip_both_sides_and_clip_fraction():
    # ratio 2 with A>0 (clipped above), ratio 0.5 with A<0 (clipped below), ratio 2 with A<0 and 0.5 with A>0 (not clipped)
    logp = np.log(np.array([[2.0, 0.5, 2.0, 0.5]], np.float32))
    old = np.zeros_like(logp)
    adv = np.array([[1.0, -1.0, -1.0, 1.0]], np.float32)
    mask = np.ones_like(logp)
    per, parts = losses.ppo_token_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), clip_low=0.2, clip_high=0.3)
    np.testing.assert_allclose(np.asarray(per), [[-1.3, 0.8, 2.0, -0.5]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(parts["clipped"]), [[1, 1, 0, 0]])
    # and the gradient vanishes exactly on the clipped tokens
    g = jax.grad(lambda lp: losses.ppo_token_loss(lp, jnp.asarray(old), jnp.asarray(adv), clip_low=0.2, clip_high=0.3)[0].sum())(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(g), [[0.0, 0.0, 2.0, -0.5]], rtol=1e-6)
    denoms = losses.minibatch_denominators(jnp.asarray(mask))
    _, stats = losses.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), denoms,
                                  agg="token_mean", clip_low=0.2, clip_high=0.3)
    assert float(stats["clipped"]) == pytest.approx(0.5)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_shares_sum_to_whole(agg):
    logp, old, ref, adv, mask = _inputs(seed=3, B=6)
    mask[5] = 0
    args = dict(agg=agg, clip_low=0.2, clip_high=0.2, ref_logp=None)
    denoms = losses.minibatch_denominators(jnp.asarray(mask))
    whole, _ = losses.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), denoms, **args)
    parts = [losses.policy_loss(jnp.asarray(logp[s]), jnp.asarray(old[s]), jnp.asarray(adv[s]), jnp.asarray(mask[s]), denoms, **args)[0]
             for s in (slice(0, 2), slice(2, 4), slice(4, 6))]
    np.testing.assert_allclose(float(sum(parts)), float(whole), rtol=1e-6)


def test_kl_estimators_are_nonnegative_where_expected_and_zero_at_equality():
    logp = jnp.asarray(np.linspace(-3, -0.1, 11, dtype=np.float32))
    for est in ("k1", "k2", "k3"):
        np.testing.assert_allclose(np.asarray(losses.kl_estimate(logp, logp, est)), 0.0, atol=1e-7)
    ref = logp + 0.7
    assert (np.asarray(losses.kl_estimate(logp, ref, "k2")) > 0).all()
    assert (np.asarray(losses.kl_estimate(logp, ref, "k3")) > 0).all()
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        losses.kl_estimate(logp, ref, "k4")
