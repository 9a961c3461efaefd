"""The jitted sharded train step on a tiny random policy over 8 simulated devices (data x fsdp x tensor)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from capo_jax import parallel
from capo_jax.models import ModelConfig, Transformer
from capo_jax.rl import losses
from capo_jax.rl.train_step import PolicyTrainer, StepOptions, response_logprobs

B, P, T, V, M, S, G = 8, 6, 8, 64, 3, 4, 4


def _model(seed=0, dtype="float32", mesh=None):
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, dtype=dtype, param_dtype="float32", initializer_range=0.2, remat=True)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    if mesh is not None:
        parallel.shard_model(model, mesh, parallel.policy_rules())
    return model


def _batch(seed=0):
    r = np.random.default_rng(seed)
    plen = r.integers(2, P + 1, B)
    prompt_mask = np.arange(P)[None] >= (P - plen)[:, None]
    rlen = r.integers(1, T + 1, B)
    response_mask = np.arange(T)[None] < rlen[:, None]
    token_step = np.where(response_mask, np.minimum(np.arange(T)[None] // 3, S - 1), -1).astype(np.int32)
    return {
        "prompt_ids": np.where(prompt_mask, r.integers(1, V, (B, P)), 0).astype(np.int32),
        "prompt_mask": prompt_mask,
        "response_ids": np.where(response_mask, r.integers(1, V, (B, T)), 0).astype(np.int32),
        "response_mask": response_mask,
        "token_step": token_step,
        "outcome": r.integers(0, 2, B).astype(np.float32),
        "votes": r.random((B, M, S)) < 0.4,
        "vote_valid": r.random((B, M)) < 0.8,
        "sampler_logp": np.where(response_mask, -r.random((B, T)) * 3, 0).astype(np.float32),
    }


def _mesh():
    return parallel.make_mesh(data=2, fsdp=2, tensor=2)


def _trainer(micro, agg="token_mean", optimizer=None, mesh=None, **kw):
    mesh = mesh or _mesh()
    opts = StepOptions(group_size=G, micro_batch_size=micro, loss_agg=agg, logprob_chunk=4, **kw)
    ref = _model(0, mesh=mesh) if opts.kl_coef > 0 else None
    return PolicyTrainer(_model(0, mesh=mesh), opts, optimizer or optax.sgd(1.0), mesh, reference=ref)


def _logprobs(model, b, chunk=4):
    """Jitted `response_logprobs` (eager op-by-op dispatch on 8 devices is slow)."""
    fn = nnx.jit(lambda m, *a: response_logprobs(m, *a, chunk))
    return fn(model, *[jnp.asarray(b[k]) for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")])


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def test_chunked_logprobs_match_full_logits():
    model = _model(1)
    b = _batch(1)
    logp, ent = _logprobs(model, b, 4)
    ids = np.concatenate([b["prompt_ids"], b["response_ids"]], 1)
    mask = np.concatenate([b["prompt_mask"], b["response_mask"]], 1)
    logits = np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask), np.float64)[:, P - 1: P + T - 1]
    ls = logits - logits.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    want = np.take_along_axis(ls, b["response_ids"][..., None], -1)[..., 0]
    want_ent = -(np.exp(ls) * ls).sum(-1)
    valid = b["response_mask"]
    np.testing.assert_allclose(np.asarray(logp)[valid], want[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[valid], want_ent[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_grad_accumulation_equals_one_big_batch(agg):
    """SGD(lr=1) makes the parameter change the exact accumulated gradient: micro 8 vs 4 x 2 rows."""
    batch, rng = _batch(2), jax.random.key(3)
    mesh = parallel.make_mesh(data=2, fsdp=1, tensor=4)  # 2-way data parallel: micro-batches of 2 rows shard
    big = _trainer(8, agg, mesh=mesh)
    small = _trainer(2, agg, mesh=mesh)
    start = _np(big.params)
    m_big = big.step(batch, rng)
    m_small = small.step(batch, rng)
    g_big = jax.tree.map(lambda a, b: a - b, _np(big.params), start)
    g_small = jax.tree.map(lambda a, b: a - b, _np(small.params), start)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g_big)) > 1e-4  # the step did move the weights
    for a, b in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_small)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(a).max()) + 1e-9)
    np.testing.assert_allclose(float(m_big["train/loss"]), float(m_small["train/loss"]), rtol=1e-5, atol=1e-7)


def test_step_loss_equals_direct_computation_and_nonfinite_skips():
    """With old log-probs recomputed (ratio 1) the step's loss is the NumPy loss on the credit advantages; then a
    batch with a NaN outcome leaves parameters and optimizer state untouched, and a clean one updates again."""
    from capo_jax.rewards.credit import compute_credits

    batch, rng = _batch(4), jax.random.key(0)
    tr = _trainer(4, "seq_mean_token_mean", optimizer=optax.adamw(1e-2))
    model = _model(0)
    adv = np.asarray(compute_credits(jnp.asarray(batch["outcome"]), jnp.asarray(batch["votes"]), jnp.asarray(batch["vote_valid"]),
                                     jnp.asarray(batch["token_step"]), jnp.asarray(batch["response_mask"]), group_size=G,
                                     vote="intersection")["advantages"])
    m = batch["response_mask"].astype(np.float64)
    want = np.mean([(-adv[b] * m[b]).sum() / m[b].sum() for b in range(B)])  # ratio = 1: loss = -A
    metrics = tr.step(batch, rng)
    np.testing.assert_allclose(float(metrics["train/loss"]), want, rtol=1e-5, atol=1e-6)
    assert float(metrics["train/ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["train/clip_frac"]) == 0.0 and float(metrics["train/skipped_updates"]) == 0.0
    assert np.isfinite(float(metrics["train/sampler_logp_gap"]))
    logp8, _ = _logprobs(model, batch, 8)
    np.testing.assert_allclose(np.asarray(logp8), np.asarray(_logprobs(model, batch, 2)[0]), rtol=1e-6, atol=1e-6)

    bad = _batch(5)
    bad["outcome"][0] = np.nan
    before_p, before_o = _np(tr.params), _np(tr.opt_state)
    metrics = tr.step(bad, jax.random.key(1))
    assert float(metrics["train/skipped_updates"]) == 1.0
    for a, b in zip(jax.tree.leaves(before_p) + jax.tree.leaves(before_o), jax.tree.leaves(_np(tr.params)) + jax.tree.leaves(_np(tr.opt_state))):
        np.testing.assert_array_equal(a, b)
    metrics = tr.step(_batch(6), jax.random.key(2))
    assert float(metrics["train/skipped_updates"]) == 0.0


def test_sharding_kl_minibatches_and_no_steady_state_compiles():
    """FSDP x tensor shardings survive the step; epochs x mini-batches with KL run; steps 2..4 compile nothing."""
    from jax import monitoring

    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, *_ , **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    tr = _trainer(4, optimizer=optax.adamw(1e-5), kl_coef=0.1, kl_estimator="k3", ppo_epochs=2, num_minibatches=2)
    embed_spec = tr.params["embed"].sharding.spec
    first = tr.step(_batch(7), jax.random.key(0))
    assert float(first["train/kl"]) < 1e-3  # policy == reference at the first update
    before = len(compiles)
    for i in range(3):
        m = tr.step(_batch(8 + i), jax.random.key(i + 1))
    assert len(compiles) == before, "a steady-state step compiled something"
    assert float(m["train/kl"]) > 0.0 and float(m["train/skipped_updates"]) == 0.0
    assert tr.params["embed"].sharding.spec == embed_spec
    assert "fsdp" in str(embed_spec) and "tensor" in str(embed_spec)
    # the live model the sampler uses holds the trained weights (same arrays, no copy)
    assert nnx.state(tr.model, nnx.Param)["embed"].get_value() is tr.params["embed"]


def test_bfloat16_compute_keeps_float32_master_weights():
    mesh = _mesh()
    opts = StepOptions(group_size=G, micro_batch_size=4, logprob_chunk=4)
    tr = PolicyTrainer(_model(0, dtype="bfloat16", mesh=mesh), opts, optax.adamw(1e-3), mesh)
    m = tr.step(_batch(9), jax.random.key(0))
    assert np.isfinite(float(m["train/loss"])) and float(m["train/skipped_updates"]) == 0
    assert {x.dtype for x in jax.tree.leaves(tr.params)} == {jnp.dtype("float32")}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tr.opt_state) if x.ndim > 0)
    # the forward really runs in bfloat16: its log-probs differ from the float32 model's
    f32 = _logprobs(_model(0), _batch(9))[0]
    bf = _logprobs(_model(0, dtype="bfloat16"), _batch(9))[0]
    assert 0 < float(jnp.max(jnp.abs(f32 - bf))) < 0.5


def test_denominators_are_taken_over_the_minibatch():
    mask = jnp.asarray(_batch(0)["response_mask"])
    d = losses.minibatch_denominators(mask)
    assert float(d["num_tokens"]) == float(mask.sum()) and float(d["num_seqs"]) == B


def test_logprob_remat_off_gives_the_same_update():
    """Keeping each chunk's logits for the backward pass (`rl.logprob_remat=False`) changes memory, not the update."""
    batch, rng = _batch(7), jax.random.key(5)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    on, off = _trainer(4, mesh=mesh), _trainer(4, mesh=mesh, logprob_remat=False)
    start = _np(on.params)
    m_on, m_off = on.step(batch, rng), off.step(batch, rng)
    np.testing.assert_allclose(float(m_on["train/loss"]), float(m_off["train/loss"]), rtol=1e-6, atol=1e-7)
    moved = [np.abs(a - s).max() for a, s in zip(jax.tree.leaves(_np(on.params)), jax.tree.leaves(start))]
    assert max(moved) > 1e-4
    for a, b in zip(jax.tree.leaves(_np(on.params)), jax.tree.leaves(_np(off.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
