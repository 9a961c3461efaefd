"""Mixed-precision einsum whose backward pass stays in the compute dtype.

A bfloat16 dot on CPU and TPU is fast only when it accumulates in float32
(`preferred_element_type=float32`). Under plain autodiff the cotangent of such a dot is float32, so
both backward dots silently run float32 x float32 (at about half the bf16 rate on this CPU, and
far below it on AMX or TPU). `einsum` here casts the cotangent to the operands' dtype first, so the
backward dots are bf16 x bf16 -> float32 like the forward one. In float32 it is a plain einsum.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _parse(eq: str) -> tuple[str, str, str]:
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    for name in set(a) | set(b):
        if name not in out and not (name in a and name in b):
            raise ValueError(f"einsum {eq!r}: index {name!r} is summed within one operand; not supported here")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed(eq: str, x: jax.Array, y: jax.Array, out_dtype) -> jax.Array:
    return jnp.einsum(eq, x, y, preferred_element_type=F32).astype(out_dtype)


def _mixed_fwd(eq, x, y, out_dtype):
    return _mixed(eq, x, y, out_dtype), (x, y)


def _mixed_bwd(eq, out_dtype, res, g):
    x, y = res
    a, b, out = _parse(eq)
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, y, preferred_element_type=F32).astype(x.dtype)
    dy = jnp.einsum(f"{out},{a}->{b}", g, x, preferred_element_type=F32).astype(y.dtype)
    return dx, dy


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def einsum(eq: str, x: jax.Array, y: jax.Array, compute_dtype, out_dtype=None) -> jax.Array:
    """`eq` over x, y cast to `compute_dtype`, accumulated in float32, returned as `out_dtype`
    (default `compute_dtype`). For a non-float32 compute dtype the backward dots also take
    `compute_dtype` operands (cotangent cast) and accumulate in float32."""
    compute_dtype = jnp.dtype(compute_dtype)
    out_dtype = compute_dtype if out_dtype is None else jnp.dtype(out_dtype)
    x, y = x.astype(compute_dtype), y.astype(compute_dtype)
    if compute_dtype == F32:
        return jnp.einsum(eq, x, y, preferred_element_type=F32).astype(out_dtype)
    _parse(eq)
    return _mixed(eq, x, y, out_dtype)
