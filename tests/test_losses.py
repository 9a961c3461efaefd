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


# ---------------------------------------------------------------------------------------------
# Numerical safety: clamped log-ratio, selected (not multiplied) aggregation, verl's dual clip


def _np_ppo(logp, old, adv, clip_low, clip_high, c):
    """verl's core_algos convention, token by token in float64: (per-token loss, d loss / d logp)."""
    per, grad = np.zeros(logp.shape), np.zeros(logp.shape)
    for i in np.ndindex(logp.shape):
        lr = min(max(float(logp[i]) - float(old[i]), -20.0), 20.0)
        r, a = np.exp(lr), float(adv[i])
        inside = abs(float(logp[i]) - float(old[i])) < 20.0  # the clamp passes the gradient only inside
        pg1, pg2 = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
        loss, g = (pg1, -a * r if inside else 0.0) if pg1 >= pg2 else (pg2, 0.0)
        if c and a < 0 and -a * c < loss:
            loss, g = -a * c, 0.0
        per[i], grad[i] = loss, g
    return per, grad


def _loss_and_grad(logp, old, adv, mask, c=0.0, **kw):
    denoms = losses.minibatch_denominators(jnp.asarray(mask))

    def f(lp):
        return losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), denoms, agg="token_mean",
                                  clip_low=0.2, clip_high=0.2, clip_ratio_c=c, **kw)[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    return float(loss), np.asarray(grad)


def test_log_ratio_95_gives_a_finite_gradient_for_a_positive_advantage():
    logp = np.array([[-5.0, -1.0]], np.float32)
    old = np.array([[-100.0, -1.2]], np.float32)  # log-ratio 95 on the first token
    adv = np.array([[1.5, 0.7]], np.float32)
    mask = np.ones_like(logp)
    naive = jax.grad(lambda lp: jnp.maximum(-adv * jnp.exp(lp - old), -adv * jnp.clip(jnp.exp(lp - old), 0.8, 1.2)).sum())
    assert np.isnan(np.asarray(naive(jnp.asarray(logp)))).any()  # the unclamped ratio: exp(95) = inf, 0 * inf = NaN
    loss, grad = _loss_and_grad(logp, old, adv, mask)
    per, want = _np_ppo(logp, old, adv, 0.2, 0.2, 0.0)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, want / mask.sum(), rtol=1e-5, atol=1e-7)


def test_log_ratio_95_gives_a_finite_loss_for_a_negative_advantage_and_the_dual_clip_caps_it():
    logp = np.array([[-5.0, -1.0]], np.float32)
    old = np.array([[-100.0, -1.0]], np.float32)
    adv = np.array([[-2.0, 0.5]], np.float32)
    mask = np.ones_like(logp)
    loss, grad = _loss_and_grad(logp, old, adv, mask)
    per, want = _np_ppo(logp, old, adv, 0.2, 0.2, 0.0)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(per[0, 0], 2.0 * np.exp(20.0))  # clamped at e^20, not inf
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, want / 2, rtol=1e-5, atol=1e-7)
    loss_c, grad_c = _loss_and_grad(logp, old, adv, mask, c=3.0)
    per_c, want_c = _np_ppo(logp, old, adv, 0.2, 0.2, 3.0)
    np.testing.assert_allclose(per_c[0, 0], 2.0 * 3.0)  # capped at -A * c
    np.testing.assert_allclose(loss_c, per_c.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad_c, want_c / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c", [0.0, 1.5, 3.0])
def test_dual_clip_matches_verl_convention_token_by_token(c):
    r = np.random.default_rng(11)
    logp = r.normal(-1.5, 0.5, (6, 9)).astype(np.float32)
    old = (logp - r.uniform(-3, 3, logp.shape)).astype(np.float32)  # ratios from e^-3 to e^3: both clips bind somewhere
    adv = r.normal(0, 1, logp.shape).astype(np.float32)
    per, parts = losses.ppo_token_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), clip_low=0.2, clip_high=0.28,
                                       clip_ratio_c=c)
    want, want_grad = _np_ppo(logp, old, adv, 0.2, 0.28, c)
    np.testing.assert_allclose(np.asarray(per), want, rtol=2e-5, atol=1e-6)
    grad = jax.grad(lambda lp: losses.ppo_token_loss(lp, jnp.asarray(old), jnp.asarray(adv), clip_low=0.2, clip_high=0.28,
                                                     clip_ratio_c=c)[0].sum())(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-5, atol=1e-6)
    capped = (adv < 0) & (want == -adv * c)
    assert (capped.any() if c else not capped.any())  # the inputs exercise the dual clip when it is on


def test_dual_clip_fraction_is_reported_apart_like_verls_lower_clip_fraction():
    r = np.random.default_rng(12)
    logp = r.normal(-1.5, 0.5, (6, 9)).astype(np.float32)
    old = (logp - r.uniform(-3, 3, logp.shape)).astype(np.float32)
    adv = r.normal(0, 1, logp.shape).astype(np.float32)
    mask = (np.arange(9)[None] < np.array([9, 4, 0, 7, 2, 9])[:, None]).astype(np.float32)
    c, low, high = 3.0, 0.2, 0.28
    # NumPy, token by token: the PPO clip binds where the clipped term is larger; the dual clip where A < 0 and the
    # clipped loss is above -A * c
    upper = np.zeros(logp.shape)
    lower = np.zeros(logp.shape)
    for i in np.ndindex(logp.shape):
        ratio, a = np.exp(float(logp[i]) - float(old[i])), float(adv[i])
        pg1, pg2 = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
        upper[i] = pg2 > pg1
        lower[i] = a < 0 and max(pg1, pg2) > -a * c
    want_upper, want_lower = (upper * mask).sum() / mask.sum(), (lower * mask).sum() / mask.sum()
    assert 0 < want_lower < want_upper  # the inputs exercise both

    def stats(c):
        denoms = losses.minibatch_denominators(jnp.asarray(mask))
        return losses.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), denoms,
                                  agg="seq_mean_token_mean", clip_low=low, clip_high=high, clip_ratio_c=c)[1]

    on = stats(c)
    np.testing.assert_allclose(float(on["clipped_dual"]), want_lower, rtol=1e-6)
    np.testing.assert_allclose(float(on["clipped"]), want_upper, rtol=1e-6)
    off = stats(0.0)
    assert "clipped_dual" not in off and float(off["clipped"]) == float(on["clipped"])
    # micro-batches' shares sum to the whole mini-batch's fraction, as every other diagnostic
    denoms = losses.minibatch_denominators(jnp.asarray(mask))
    halves = [losses.policy_loss(jnp.asarray(logp[s]), jnp.asarray(old[s]), jnp.asarray(adv[s]), jnp.asarray(mask[s]),
                                 denoms, agg="token_mean", clip_low=low, clip_high=high, clip_ratio_c=c)[1]["clipped_dual"]
              for s in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(float(sum(halves)), want_lower, rtol=1e-6)


def test_a_dual_clip_train_step_logs_the_dual_clip_fraction():
    from test_train_step import _batch, _trainer  # tests/ is on the path (as tiny_hf is for others)

    metrics = _trainer(4, clip_ratio_c=3.0).step(_batch(1), jax.random.key(0))
    assert 0.0 <= float(metrics["train/clip_frac_dual"]) <= 1.0


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_values_in_padded_positions_leave_the_loss_and_gradient_finite(bad):
    logp, old, ref, adv, mask = _inputs(seed=5)
    pad = mask == 0
    dirty = [x.copy() for x in (logp, old, ref, adv)]
    for x in dirty:
        x[pad] = bad
    clean = [np.where(pad, 0.0, x).astype(np.float32) for x in (logp, old, ref, adv)]
    kw = dict(kl_coef=0.1, kl_estimator="k3")
    loss, grad = _loss_and_grad(dirty[0], dirty[1], dirty[3], mask, ref_logp=jnp.asarray(dirty[2]), **kw)
    want, want_grad = _loss_and_grad(clean[0], clean[1], clean[3], mask, ref_logp=jnp.asarray(clean[2]), **kw)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, _np_loss(logp, old, ref, adv, mask, "token_mean", 0.2, 0.2, 0.1, "k3"), rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_array_equal(grad, want_grad)
    assert (grad[pad] == 0).all()
    # aggregate alone: an inf where the weight is 0 is selected out (inf * 0 would be NaN)
    per = np.where(pad, bad, 1.0).astype(np.float32)
    w = mask / mask.sum()
    assert float(losses.aggregate(jnp.asarray(per), jnp.asarray(w))) == pytest.approx(1.0)
