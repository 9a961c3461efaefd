"""KVCache: the per-layer key/value buffers a sampler carries between decode steps (a pytree)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from capo_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys/values `[layers, B, kv_heads, S_max, head_dim]` (stacked) or a tuple of per-layer
    `[B, kv_heads, S_max, head_dim]` buffers, `mask` bool[B, S_max] (slot holds a real token) and `index` int32[]
    (next slot to write). Stacked suits a scanned layer stack (it scans over the layer axis); per-layer suits
    layers run one by one, which then read their buffer in place (when it holds the compute dtype) instead of
    copying a slice of the stack each step. Heads come before slots so a layer's keys are already in the layout
    the attention dots read."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return int((self.k[0] if self.per_layer else self.k).shape[-2])

    def num_valid(self) -> jax.Array:
        """int32[B]: how many real tokens each row already holds."""
        return jnp.sum(self.mask, axis=-1, dtype=jnp.int32)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None,
               per_layer: bool = False) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens; `dtype` defaults to the compute dtype.
    `per_layer` gives one buffer per layer (only for models run with `scan_layers=False`)."""
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)

    def buffers():
        if per_layer:
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return jnp.zeros((config.num_layers, *shape), dtype)

    return KVCache(
        k=buffers(),
        v=buffers(),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


# Logical axis names of each KVCache field, stacked layout (for `capo_jax.parallel.cache_shardings`; a per-layer
# buffer has the same names without "layers").
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "mask": ("batch", "length"),
    "index": (),
}
