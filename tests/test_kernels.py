"""The model's numerics kernels against NumPy and PyTorch: blocked causal attention, the mixed-precision einsum
the weight matmul's two orientations and the SwiGLU MLP's hand-written backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from capo_jax.models.attention import attend, causal_attend
from capo_jax.models.einsum import einsum
from capo_jax.models.linear import WEIGHT_MAJOR_MAX_ROWS, linear, weight_major
from capo_jax.models.swiglu import swiglu_mlp


def _np_causal_attention(q, k, v, key_mask):
    """float64 masked softmax attention with grouped-query heads, the textbook way."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(d)
    allowed = key_mask[:, None, None, :] & np.tril(np.ones((t, t), bool))[None, None]
    s = np.where(allowed, s, -np.inf)
    with np.errstate(invalid="ignore"):  # pad rows see no key: NaN here, never compared
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, vv)


@pytest.mark.parametrize("t,block", [(37, 16), (32, 8), (5, 16)])
def test_causal_attend_matches_numpy(t, block):
    r = np.random.default_rng(t)
    b, h, kv, d = 3, 4, 2, 8
    q, k, v = (r.standard_normal(shape).astype(np.float32) for shape in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    pad = np.array([0, 3, t - 1])  # left padding per row; the last row sees one key only
    key_mask = np.arange(t)[None] >= pad[:, None]
    got = np.asarray(jax.jit(lambda *a: causal_attend(*a, block=block))(q, k, v, key_mask))
    want = _np_causal_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), key_mask)
    seen = key_mask  # a query at a valid slot always sees itself; pad slots are never read
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(got))
    # the unblocked kernel under the explicit causal mask agrees too
    allowed = key_mask[:, None, :] & np.tril(np.ones((t, t), bool))[None]
    full = np.asarray(jax.jit(attend)(q, k, v, allowed))
    np.testing.assert_allclose(got[seen], full[seen], rtol=1e-5, atol=1e-5)
    # and so does it on keys/values in the KV cache's [B, KV, S, D] layout
    heads_major = jax.jit(lambda *a: attend(*a, heads_major=True))(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                                                   allowed)
    np.testing.assert_allclose(np.asarray(heads_major)[seen], full[seen], rtol=1e-5, atol=1e-5)


def test_causal_attend_gradient_matches_full_square():
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in [(2, 24, 4, 8), (2, 24, 2, 8), (2, 24, 2, 8)])
    key_mask = jnp.ones((2, 24), bool)
    w = jnp.asarray(r.standard_normal((2, 24, 4, 8)), jnp.float32)
    allowed = key_mask[:, None, :] & jnp.tril(jnp.ones((24, 24), bool))[None]
    blocked = jax.grad(lambda q, k, v: jnp.sum(causal_attend(q, k, v, key_mask, block=8) * w), argnums=(0, 1, 2))(q, k, v)
    full = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, allowed) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(blocked, full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _dot_dtypes(fn, *args):
    """Operand dtypes of every dot_general in the jaxpr of `fn` (nested jaxprs included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(x.aval.dtype) for x in eqn.invars))
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bf16_einsum_backward_runs_bf16_dots_and_matches_float32():
    r = np.random.default_rng(1)
    x = jnp.asarray(r.standard_normal((64, 48)), jnp.float32)
    w = jnp.asarray(r.standard_normal((32, 48)) * 0.1, jnp.float32)

    def loss(x, w, dt):
        return jnp.sum(jnp.square(einsum("te,me->tm", x, w, dt, jnp.float32)))

    g16 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
    g32 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.float32)
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.float32  # gradients come back in the inputs' dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))
    dots = _dot_dtypes(jax.grad(lambda x, w: loss(x, w, jnp.bfloat16), argnums=(0, 1)), x, w)
    assert len(dots) == 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
    # float32 is a plain einsum: the forward equals jnp.einsum exactly
    np.testing.assert_array_equal(np.asarray(einsum("te,me->tm", x, w, jnp.float32)), np.asarray(jnp.einsum("te,me->tm", x, w)))


def test_einsum_refuses_an_index_summed_inside_one_operand():
    x = jnp.ones((4, 3), jnp.bfloat16)
    with pytest.raises(ValueError, match="summed within one operand"):
        einsum("ab,bc->a", x, x.T, jnp.bfloat16)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_swiglu_mlp_value_and_gradients_match_torch_autograd(dtype, tol):
    """The hand-written backward against PyTorch float64 autograd of down(silu(x gate^T) * (x up^T))."""
    r = np.random.default_rng(2)
    x, gate, up, down, w = (r.standard_normal(s) * c for s, c in
                            [((2, 5, 16), 1.0), ((24, 16), 0.3), ((24, 16), 0.3), ((16, 24), 0.3), ((2, 5, 16), 1.0)])

    def loss(x, gate, up, down):
        return jnp.sum(swiglu_mlp(x, gate, up, down, dtype).astype(jnp.float32) * w)

    args = [jnp.asarray(a, jnp.float32) for a in (x, gate, up, down)]
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    tx, tg, tu, td = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, gate, up, down))
    ref = torch.sum((torch.nn.functional.silu(tx @ tg.T) * (tx @ tu.T)) @ td.T * torch.tensor(w))
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=tol, atol=tol)
    for got, want in zip(grads, (tx.grad, tg.grad, tu.grad, td.grad)):
        want = want.numpy()
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol * np.abs(want).max())
    if dtype == jnp.bfloat16:  # every backward dot takes bf16 operands, as the forward ones
        dots = _dot_dtypes(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
        assert len(dots) == 7 and all(d == ("bfloat16", "bfloat16") for d in dots), dots


@pytest.mark.parametrize("rows", [3, WEIGHT_MAJOR_MAX_ROWS + 5])
def test_linear_both_orientations_match_numpy_with_gradients(rows):
    """Few float32 rows take the weight-major product (w @ x^T behind a barrier), many rows the usual one:
    values and gradients equal float64 NumPy either way."""
    on_cpu = jax.default_backend() == "cpu"  # the weight-major product is a CPU-only choice
    assert weight_major(rows, jnp.float32) == (on_cpu and rows <= WEIGHT_MAJOR_MAX_ROWS)
    assert not weight_major(rows, jnp.bfloat16)
    r = np.random.default_rng(rows)
    x, w, dy = r.standard_normal((rows, 1, 24)), r.standard_normal((40, 24)) * 0.2, r.standard_normal((rows, 1, 40))
    y, vjp = jax.vjp(lambda x, w: linear(x, w, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    assert y.shape == (rows, 1, 40) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dy @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("nto,nti->oi", dy, x), rtol=1e-5, atol=1e-4)
