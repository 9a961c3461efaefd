"""Weight matmuls in Hugging Face's [out, in] layout, x[..., in] -> [..., out], oriented for the faster kernel.

Why: on XLA:CPU a float32 product with few rows runs up to 2x faster as w @ x^T (the weight streamed as the
left operand) than as x @ w^T: 36 MLP matrices of a decode step at 8 rows took 10.0 vs 19.6 ms, at 32 rows
20.9 vs 32.5 ms; from about 128 rows on the usual orientation wins (at 512: 281 vs 332 ms), and for
bfloat16 it always does. An optimization barrier keeps XLA from folding the transpose back into the dot.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from capo_jax.models.einsum import einsum

F32 = jnp.float32
WEIGHT_MAJOR_MAX_ROWS = 128  # float32 on CPU: w @ x^T up to this many rows (measured crossover 128-512)


def weight_major(rows: int, compute_dtype) -> bool:
    """Whether `linear` streams the weight as the left operand for this many rows in this dtype. `rows` counts
    the whole (global) batch and the backend is the default one at trace time: a speed choice only, both
    orientations give the same values."""
    return (jnp.dtype(compute_dtype) == F32 and rows <= WEIGHT_MAJOR_MAX_ROWS
            and jax.default_backend() == "cpu")


def linear(x: jax.Array, w: jax.Array, compute_dtype, out_dtype=None) -> jax.Array:
    """x[..., in] times w[out, in] transposed -> [..., out]: operands in `compute_dtype`, accumulated in
    float32, returned as `out_dtype` (default `compute_dtype`); bf16 backward as `models.einsum.einsum`."""
    compute_dtype = jnp.dtype(compute_dtype)
    out_dtype = compute_dtype if out_dtype is None else jnp.dtype(out_dtype)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, x.shape[-1])
    if weight_major(rows, compute_dtype):
        yt = jnp.einsum("oi,ni->on", w.astype(F32), x2.astype(F32), preferred_element_type=F32)
        y = jax.lax.optimization_barrier(yt).T.astype(out_dtype)
    else:
        y = einsum("ni,oi->no", x2, w, compute_dtype, out_dtype)
    return y.reshape(*lead, w.shape[0])
