"""Softmax attention kernels: grouped-query attention under an explicit mask, and causal attention
computed in query blocks so the masked upper triangle of the score matrix is mostly never built.

Scores and softmax are float32. A query with no visible key (a left-pad slot) gets a uniform
average of the keys it was offered instead of NaN; such rows are padding and are never read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capo_jax.models.einsum import einsum

F32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)
CAUSAL_BLOCK = 128  # query rows per block of causal attention


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, heads_major: bool = False) -> jax.Array:
    """q[B,T,H,D] over k,v[B,S,KV,D] (H a multiple of KV) where allowed[B,T,S] -> [B,T,H,D].
    `heads_major`: k,v are [B,KV,S,D] instead (the KV cache's layout, which the score and value dots read in place)."""
    b, t, h, d = q.shape
    kvh = k.shape[1 if heads_major else 2]
    dt = q.dtype
    kspec = "bksd" if heads_major else "bskd"
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = einsum(f"btkgd,{kspec}->bkgts", qg, k, dt, F32) * (d ** -0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    if heads_major:  # probs[g*t, s] @ v[s, d] per (b, k): XLA:CPU's fast row-major case (t is 1 when decoding)
        out = jnp.transpose(einsum("bkgts,bksd->bkgtd", probs, v, dt), (0, 3, 1, 2, 4))
    else:
        out = einsum("bkgts,bskd->btkgd", probs, v, dt)
    return out.reshape(b, t, h, d)


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
                  block: int = CAUSAL_BLOCK) -> jax.Array:
    """Causal self-attention of q[B,T,H,D] over k,v[B,T,KV,D] whose key slots are valid where
    key_mask[B,T]. Query block [s, e) attends keys [0, e) only: about half the score FLOPs and
    memory of the full square at long T, and the same result on every row that has a visible key."""
    t = q.shape[1]
    outs = []
    for s in range(0, t, block):
        e = min(t, s + block)
        causal = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]
        allowed = key_mask[:, None, :e] & causal[None]
        outs.append(attend(q[:, s:e], k[:, :e], v[:, :e], allowed))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
