"""Weight matmuls in Hugging Face's [out, in] layout, x[..., in] -> [..., out], oriented for the faster kernel.

Why: XLA:CPU runs a float32 product with few rows faster as w @ x^T (the weight streamed as the left operand)
than as x @ w^T; from a few hundred rows on, and for bfloat16 always, the usual orientation wins. Accelerators
take the usual orientation. The choice follows the devices the program is traced for (the mesh of the enclosing
`parallel.activation_sharding`, else jax's default backend), so a TPU program traced on a CPU host is not given
the CPU layout. An optimization barrier keeps XLA from folding the transpose back into the dot.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from capo_jax import parallel
from capo_jax.models.einsum import einsum

F32 = jnp.float32
WEIGHT_MAJOR_MAX_ROWS = 128  # float32 on CPU: w @ x^T up to this many rows (the crossover measured on XLA:CPU)


def weight_major(rows: int, compute_dtype, platform: str | None = None) -> bool:
    """Whether `linear` streams the weight as the left operand for this many rows in this dtype on `platform`
    (default: the platform being traced for, see `parallel.target_platform`). `rows` counts the whole (global)
    batch. A speed choice only: both orientations give the same values."""
    platform = parallel.target_platform() if platform is None else platform
    return jnp.dtype(compute_dtype) == F32 and rows <= WEIGHT_MAJOR_MAX_ROWS and platform == "cpu"


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
