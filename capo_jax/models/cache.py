"""KVCache: the per-layer key/value buffers a sampler carries between decode steps (a pytree)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from capo_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys/values `[layers, B, S_max, kv_heads, head_dim]`, `mask` bool[B, S_max] (slot holds a real token)
    and `index` int32[] (next slot to write). The layer axis is first so the scanned layer stack scans over it."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])

    def num_valid(self) -> jax.Array:
        """int32[B]: how many real tokens each row already holds."""
        return jnp.sum(self.mask, axis=-1, dtype=jnp.int32)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens; `dtype` defaults to the compute dtype."""
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


# Logical axis names of each KVCache field (for `capo_jax.parallel.cache_shardings`).
CACHE_AXES = {
    "k": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "mask": ("batch", "length"),
    "index": (),
}
