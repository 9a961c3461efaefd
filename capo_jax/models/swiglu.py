"""The SwiGLU MLP, down(silu(x gate^T) * (x up^T)), as one function with a hand-written backward.

Why: under plain autodiff XLA:CPU fused the activation's derivative with a transpose into the weight
gradient's layout and ran it as a strided loop, and took the gate and up gradients as separate GEMMs. Here the
backward computes both cotangents once, stacks them, and takes dx and the two weight gradients as one GEMM each
(figures: docs/benchmarks.md). The forward is the plain one (its matmuls through
`models.linear`). The same backward runs on every backend; its speed was measured on XLA:CPU only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from capo_jax.models.linear import linear

F32 = jnp.float32


def _dot(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(eq, a, b, preferred_element_type=F32)


def _forward(x, gate, up, down, dtype):
    g = linear(x, gate, dtype, F32)
    u = linear(x, up, dtype, F32)
    h = (jax.nn.silu(g) * u).astype(dtype)
    return linear(h, down, dtype), g, u


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mlp2d(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, dtype) -> jax.Array:
    return _forward(x, gate, up, down, dtype)[0]


def _mlp2d_fwd(x, gate, up, down, dtype):
    y, g, u = _forward(x, gate, up, down, dtype)
    return y, (x, g, u, gate, up, down)


def _mlp2d_bwd(dtype, res, dy):
    x, g, u, gate, up, down = res
    s = jax.nn.sigmoid(g)
    silu = g * s
    dy = dy.astype(dtype)  # backward dots take compute-dtype operands, as the forward ones (see models/einsum.py)
    d_down = _dot("ne,nm->em", dy, (silu * u).astype(dtype))
    dh = _dot("ne,em->nm", dy, down)
    dgu = jnp.stack([dh * u * s * (1 + g * (1 - s)), dh * silu], axis=1).astype(dtype)  # [N, 2, M]
    dx = _dot("nkm,kme->ne", dgu, jnp.stack([gate, up]))
    dw = _dot("nkm,ne->kme", dgu, x)
    return dx.astype(x.dtype), dw[0].astype(gate.dtype), dw[1].astype(up.dtype), d_down.astype(down.dtype)


_mlp2d.defvjp(_mlp2d_fwd, _mlp2d_bwd)


def swiglu_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, dtype) -> jax.Array:
    """x[..., E] through gate, up [M, E] and down [E, M] (Hugging Face's [out, in] layout) -> [..., E] in `dtype`.
    Operands are cast to `dtype`; dots accumulate in float32 and the activation is computed in float32."""
    dtype = jnp.dtype(dtype)
    lead, e = x.shape[:-1], x.shape[-1]
    y = _mlp2d(x.reshape(-1, e).astype(dtype), gate.astype(dtype), up.astype(dtype), down.astype(dtype), dtype)
    return y.reshape(*lead, e)
