"""capo_jax.models: the NNX decoder (Llama-3.x / Qwen2 / Qwen2.5 / Qwen3), its KV cache, Hugging Face in/out.

Importing this package turns off Flax eager sharding so parameters keep *logical* axis names
(`embed`, `mlp`, ...) that `capo_jax.parallel` maps to mesh axes per role.
"""
import flax

flax.config.update("flax_always_shard_variable", False)

from capo_jax.models.cache import KVCache, init_cache  # noqa: E402
from capo_jax.models.config import ModelConfig  # noqa: E402
from capo_jax.models.hf_io import CheckpointError, from_pretrained, save_pretrained  # noqa: E402
from capo_jax.models.transformer import (  # noqa: E402
    Transformer, count_params, create_model, default_positions, forward)

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Transformer", "count_params", "create_model",
           "default_positions", "forward", "from_pretrained", "init_cache", "save_pretrained"]
