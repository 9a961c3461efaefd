"""The NNX decoder-only transformer for the Llama-3.x / Qwen2 / Qwen2.5 / Qwen3 families, with an optional KV cache.

Layers are stored stacked (`[layers, ...]`) and run under `jax.lax.scan` so compile time does not grow with
depth (`scan_layers=False` keeps a Python list of layers instead). Every parameter carries logical axis names
in its `out_sharding` metadata; `capo_jax.parallel` maps them to mesh axes per role.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capo_jax import parallel
from capo_jax.models.attention import attend, causal_attend
from capo_jax.models.cache import KVCache
from capo_jax.models.config import ModelConfig
from capo_jax.models.linear import linear
from capo_jax.models.swiglu import swiglu_mlp

F32 = jnp.float32
_ACT = ("batch", "length", None)  # activations [B, T, E]: batch sharded, embed replicated


# ----------------------------------------------------------------------------- parameters


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...], cfg: ModelConfig,
           stack: int | None, init: str) -> nnx.Param:
    """A parameter with logical names; `stack` prepends a `layers` axis (scanned layout)."""
    if stack is not None:
        shape, names = (stack, *shape), ("layers", *names)
    dtype = cfg.weight_dtype
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (cfg.initializer_range * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _weight(param: nnx.Variable, dtype) -> jax.Array:
    """A parameter's value in the compute dtype, gathered for compute under activation sharding (FSDP: once per
    use, its gradient reduce-scattered back; see `parallel.gather_weight`). Inside the layer scan a stacked
    parameter arrives as one layer's slice: its names lose the leading `layers`."""
    value = param[...]
    names = parallel.variable_names(param)
    if names is not None and len(names) == value.ndim + 1 and names[0] == "layers":
        names = names[1:]
    return parallel.gather_weight(value, names, dtype)


def _head_proj(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x[B,T,E] through a per-head kernel w[heads, D, E] -> [B,T,heads,D], as one 2D matmul over the flattened
    [heads*D, E] kernel: with the 3D einsum XLA:CPU transposed the kernel on every call (per decode step)."""
    heads, d, e = w.shape
    out = linear(x, w.reshape(heads * d, e), dtype)
    return out.reshape(*out.shape[:-1], heads, d)


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32 (as transformers does), scaled by a learned weight."""

    def __init__(self, dim: int, cfg: ModelConfig, *, stack: int | None = None):
        self.eps = cfg.rms_norm_eps
        self.scale = _param(None, (dim,), ("norm",), cfg, stack, "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _weight(self.scale, x.dtype) * y.astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies float32[head_dim/2] for plain, `linear` and `llama3` RoPE (transformers' formulas)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    factor = float(rs["factor"])
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32[B, T, head_dim] for integer positions[B, T]."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x[B, T, heads, head_dim] by the (rotate-half convention) angle tables."""
    x32 = x.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# ----------------------------------------------------------------------------- layers


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v(/o) biases and Qwen3's per-head q/k RMSNorm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Kernels keep Hugging Face's [out, in] layout (split per head), so loading and saving never transpose.
        self.q = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), cfg, stack, "normal")
        self.k = _param(rngs, (kv, d, e), ("kv_heads", "head_dim", "embed"), cfg, stack, "normal")
        self.v = _param(rngs, (kv, d, e), ("kv_heads", "head_dim", "embed"), cfg, stack, "normal")
        self.o = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), cfg, stack, "normal")
        if cfg.attention_bias:
            self.q_bias = _param(None, (h, d), ("heads", "head_dim"), cfg, stack, "zeros")
            self.k_bias = _param(None, (kv, d), ("kv_heads", "head_dim"), cfg, stack, "zeros")
            self.v_bias = _param(None, (kv, d), ("kv_heads", "head_dim"), cfg, stack, "zeros")
        if cfg.attention_out_bias:
            self.o_bias = _param(None, (e,), ("embed",), cfg, stack, "zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg, stack=stack)
            self.k_norm = RMSNorm(d, cfg, stack=stack)
        self.cfg = cfg

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None,
                 layer: jax.Array | int) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x[B,T,E] -> [B,T,E]. With `kv` (the whole cache: stacked `[layers,B,KV,S,D]` arrays or tuples of per-layer
        `[B,KV,S,D]` buffers) the new keys/values are written at `layer`, slots `index..`. `allowed` is either the key
        padding mask bool[B,T] of causal self-attention among the new tokens (no cache, or an empty one: a prefill
        attends block by block over its own keys, never over the whole cache), or bool[B,T,S]: which cache slots
        each query sees."""
        cfg, dt = self.cfg, x.dtype
        q, k, v = (_head_proj(x, _weight(w, dt), dt) for w in (self.q, self.k, self.v))
        if cfg.attention_bias:
            q = q + _weight(self.q_bias, dt)
            k = k + _weight(self.k_bias, dt)
            v = v + _weight(self.v_bias, dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_new, v_new = k, v
        if kv is not None:
            k_all, v_all = kv
            if isinstance(k_all, tuple):  # per-layer buffers (layers run one by one: `layer` is a Python int)
                at = (0, 0, index, 0)
                k_l = jax.lax.dynamic_update_slice(k_all[layer], _heads_major(k, k_all[layer].dtype), at)
                v_l = jax.lax.dynamic_update_slice(v_all[layer], _heads_major(v, v_all[layer].dtype), at)
                kv = (_replace_at(k_all, layer, k_l), _replace_at(v_all, layer, v_l))
                k, v = k_l.astype(dt), v_l.astype(dt)
            else:
                start = (layer, 0, 0, index, 0)
                k_all = jax.lax.dynamic_update_slice(k_all, _heads_major(k, k_all.dtype)[None], start)
                v_all = jax.lax.dynamic_update_slice(v_all, _heads_major(v, v_all.dtype)[None], start)
                k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
                v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
                kv = (k_all, v_all)
        if allowed.ndim == 2:
            out = causal_attend(q, k_new, v_new, allowed)
        else:
            out = attend(q, k, v, allowed, heads_major=True)
        b, t, h, d = out.shape
        out = linear(out.reshape(b, t, h * d), _weight(self.o, dt).reshape(-1, h * d), dt)
        if cfg.attention_out_bias:
            out = out + _weight(self.o_bias, dt)
        return out, kv


def _heads_major(x: jax.Array, dtype) -> jax.Array:
    """New keys/values [B,T,KV,D] in the cache's [B,KV,T,D] order and dtype."""
    return jnp.swapaxes(x, 1, 2).astype(dtype)


def _replace_at(buffers: tuple, i: int, x: jax.Array) -> tuple:
    """The tuple with item i replaced by x."""
    return buffers[:i] + (x,) + buffers[i + 1:]


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (m, e), ("mlp", "embed"), cfg, stack, "normal")
        self.up = _param(rngs, (m, e), ("mlp", "embed"), cfg, stack, "normal")
        self.down = _param(rngs, (e, m), ("embed", "mlp"), cfg, stack, "normal")

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        return swiglu_mlp(x, _weight(self.gate, dt), _weight(self.up, dt), _weight(self.down, dt), dt)


class Block(nnx.Module):
    """One pre-norm decoder layer: x + attn(norm x), then + mlp(norm x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, stack=stack)
        self.attn = Attention(cfg, rngs=rngs, stack=stack)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, stack=stack)
        self.mlp = MLP(cfg, rngs=rngs, stack=stack)

    def __call__(self, x, cos, sin, allowed, kv, index, layer):
        h, kv = self.attn(self.attn_norm(x), cos, sin, allowed, kv, index, layer)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


# ----------------------------------------------------------------------------- the model


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids, attention_mask, positions)` -> float32 logits[B,T,V];
    with `cache=` it returns `(logits, new_cache)`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg, None, "normal")
        if cfg.scan_layers:
            self.layers = Block(cfg, rngs=rngs, stack=cfg.num_layers)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg, None, "normal")

    # -- public API

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None, *, empty_cache: bool = False):
        out = self.hidden_states(input_ids, attention_mask, positions, cache, empty_cache=empty_cache)
        if cache is None:
            return self.logits(out)
        hidden, cache = out
        return self.logits(hidden), cache

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None, cache: KVCache | None = None, *, empty_cache: bool = False):
        """Final normed hidden states [B,T,E] in the compute dtype (and the updated cache when one is given).
        `empty_cache=True` promises the cache holds no tokens yet (a prefill): attention then runs blockwise causal
        among the new tokens instead of over every slot of the cache."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        am = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if positions is None:
            positions = default_positions(am, None if cache is None else cache.num_valid())
        positions = jnp.asarray(positions, jnp.int32)
        cos, sin = rope_tables(positions, rope_inv_freq(cfg))

        if cache is None:
            allowed = am  # key padding mask; causal_attend adds the causal part block by block
            kv, index, new_mask = None, None, None
        else:
            _check_room(cache, t)
            if cache.per_layer and cfg.scan_layers:
                raise ValueError("a per-layer KV cache needs the layers run one by one; use init_cache(..., "
                                 "per_layer=False) with a scan_layers=True model")
            index = jnp.asarray(cache.index, jnp.int32)
            new_mask = jax.lax.dynamic_update_slice(cache.mask, am, (0, index))
            if empty_cache:
                allowed = am  # the new tokens see each other only: blockwise causal, as without a cache
            else:
                slots = jnp.arange(cache.max_len, dtype=jnp.int32)
                causal = slots[None, :] <= (index + jnp.arange(t, dtype=jnp.int32))[:, None]
                allowed = new_mask[:, None, :] & causal[None]
            kv = (cache.k, cache.v)

        # the lookup reads a few rows: the table stays as stored (XLA gathers rows, not the whole table)
        x = parallel.constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.compute_dtype), _ACT)
        x, kv = self._run_layers(x, cos, sin, allowed, kv, index)
        hidden = self.norm(x)
        if cache is None:
            return hidden
        return hidden, KVCache(k=kv[0], v=kv[1], mask=new_mask, index=index + t)

    def head_weight(self, names: tuple = ("vocab", None)) -> jax.Array:
        """The vocab projection [V, E] (the tied embedding or lm_head) in the compute dtype, laid out for the matmul
        by logical `names` (default: vocab split per the rules, embed whole; under FSDP one all-gather, whose
        gradient is reduce-scattered back). Take it once and pass it to every `logits(..., head=)` call of a loop,
        rather than laying it out again per call."""
        head = self.embed if self.config.tie_word_embeddings else self.lm_head
        return parallel.relayout(head[...].astype(self.config.compute_dtype), names, ("vocab", "embed"))

    def logits(self, hidden: jax.Array, head: jax.Array | None = None,
               names: tuple = ("batch", "length", "vocab")) -> jax.Array:
        """float32 logits [..., V] from final hidden states [..., E] (`head`: a `head_weight()` taken earlier;
        `names`: the logical layout of 3D logits under activation sharding)."""
        dt = self.config.compute_dtype
        out = linear(hidden, self.head_weight() if head is None else head, dt, F32)
        return parallel.constrain(out, names) if out.ndim == 3 else out

    # -- internals

    def _run_layers(self, x, cos, sin, allowed, kv, index):
        cfg = self.config

        def step(layer_state, graphdef, x, kv, i):
            x, kv = nnx.merge(graphdef, layer_state)(x, cos, sin, allowed, kv, index, i)
            return parallel.constrain(x, _ACT), kv

        if cfg.remat:  # the layer index stays a Python int when layers run one by one (per-layer KV buffers)
            step = jax.checkpoint(step, prevent_cse=False, static_argnums=(1,) if cfg.scan_layers else (1, 4))
        if not cfg.scan_layers:
            for i, block in enumerate(self.layers):
                graphdef, state = nnx.split(block)
                x, kv = step(state, graphdef, x, kv, i)
            return x, kv
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer_state):
            x, kv, i = carry
            x, kv = step(layer_state, graphdef, x, kv, i)
            return (x, kv, i + 1), None

        (x, kv, _), _ = jax.lax.scan(body, (x, kv, jnp.zeros((), jnp.int32)), state)
        return x, kv


def _check_room(cache: KVCache, t: int) -> None:
    """Outside jit, refuse a write past the cache's end (inside jit the caller sizes `max_len`: the write would
    be clamped to the last slots)."""
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > cache.max_len:
        raise ValueError(f"KV cache full: {int(cache.index)} + {t} new tokens > max_len {cache.max_len}; "
                         "allocate init_cache with a larger max_len")


def default_positions(attention_mask: jax.Array, already: jax.Array | None = None) -> jax.Array:
    """Positions counting each row's real tokens from 0 (or from `already[B]` cached ones); pads get the
    position of the next real token, clipped at 0 (their value never matters: nobody attends to them)."""
    am = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(am, axis=-1) - 1
    if already is not None:
        pos = pos + already[:, None]
    return jnp.maximum(pos, 0).astype(jnp.int32)


def repeat_kv_heads(config: ModelConfig, state: nnx.State, repeats: int) -> tuple[ModelConfig, nnx.State]:
    """The same model with each KV head repeated `repeats` times: config with `num_kv_heads * repeats` and a state
    whose variables with a `kv_heads` axis (k, v kernels and biases) repeat along it. Exact for grouped-query
    attention: query head j reads KV head j // (H / KV) either way."""
    if repeats == 1:
        return config, state

    def one(var):
        names = parallel.variable_names(var) if isinstance(var, nnx.Variable) else None
        if not names or "kv_heads" not in names:
            return var
        return var.replace(jnp.repeat(var[...], repeats, axis=names.index("kv_heads")))

    state = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return config.replace(num_kv_heads=config.num_kv_heads * repeats), state


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars in a model."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create_model(config: ModelConfig, *, seed: int = 0, mesh: Any = None, rules: Any = None) -> Transformer:
    """A randomly initialised Transformer, created in one compiled program (fast), each parameter placed on its
    sharding under `rules` (default `policy_rules()`) when `mesh` is given. Use for models trained from scratch."""
    def rngs():  # the RngBitGenerator key compiles faster than threefry on CPU
        return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=rngs()))
    graphdef, abs_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        shardings = parallel.state_shardings(abs_state, mesh, rules or parallel.policy_rules())

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(Transformer(config, rngs=rngs()))

    return nnx.merge(graphdef, init())


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, input_ids, attention_mask, positions, cache):
    return nnx.merge(graphdef, state)(input_ids, attention_mask, positions, cache)


def forward(model: Transformer, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, cache: KVCache | None = None):
    """`model(...)` through a jit cached per (graph, shapes): the convenient way to run a model outside a jitted
    loop (an eager call re-traces the layer scan every time)."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, input_ids, attention_mask, positions, cache)
