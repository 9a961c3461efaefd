"""Compiled KV-cache sampler: a jitted prefill, then a jitted `lax.while_loop` decode that stops early.

Policy rollouts and critic generation both call `generate`. Prompts are left-padded into static length and
batch buckets; each prompt is prefilled once and its cache broadcast to its `n` samples. Row `i * n + j`
holds sample `j` of prompt `i`; its random key derives from (rng, i, j, step) only, so results do not depend
on bucket padding or device count. The jitted functions take the model's graphdef and a hashable plan as
static arguments, so later calls with new weights or new prompts in the same bucket compile nothing.

Rollouts are an inference workload: `InferenceCopy` turns a trained model (FSDP-sharded float32 master weights)
into a compute-dtype copy in the inference layout by one jitted reshard, and `generate` runs on that copy; with a
mesh, both programs are traced under the inference rules' activation sharding. `lower_generate` lowers the very
programs `generate` runs for abstract inputs (the planner compiles them for TPU slices).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from capo_jax import parallel
from capo_jax.models import KVCache, init_cache
from capo_jax.models.config import canonical_dtype

__all__ = ["GenerationResult", "InferenceCopy", "SamplingParams", "TextGenerationResult", "batch_bucket", "generate",
           "generate_text", "lower_generate", "prompt_bucket"]


# ----------------------------------------------------------------------------- public types


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample (frozen, hashable).

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. Sequences stop at any of
    `stop_token_ids` and, unless `ignore_eos`, at the model config's EOS ids; the stop token is returned.
    `kv_cache_dtype` None means bfloat16 on accelerators and the model's compute dtype on CPU.
    `pad_token_id` None means the model config's pad id (0 if it has none). Prompt lengths round up to a
    power of two up to `bucket_multiple`, then to a multiple of it. `share_prefix=False` prefills every
    sample separately (same keys, same tokens; for tests and comparisons).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    kv_cache_dtype: str | None = None
    pad_token_id: int | None = None
    bucket_multiple: int = 64
    share_prefix: bool = True

    def __post_init__(self):
        stops = self.stop_token_ids
        if isinstance(stops, (int, np.integer)):
            stops = (stops,)
        object.__setattr__(self, "stop_token_ids", tuple(sorted({int(t) for t in stops})))
        if self.kv_cache_dtype is not None:
            object.__setattr__(self, "kv_cache_dtype", canonical_dtype(self.kv_cache_dtype))
        if int(self.n) < 1:
            raise ValueError(f"SamplingParams.n={self.n}: need at least one sample per prompt")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not (float(self.temperature) >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature={self.temperature}: use 0 (greedy) or a positive number")
        if int(self.top_k) < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k}: use 0 (off) or a positive count")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p}: must lie in (0, 1] (1 = off)")
        if int(self.bucket_multiple) < 1:
            raise ValueError(f"SamplingParams.bucket_multiple={self.bucket_multiple}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


class GenerationResult(NamedTuple):
    """Per sample (row `i * n + j` = sample j of prompt i): new token ids (pad past `lengths`), the
    temperature-1 log-probability of each sampled token under the raw logits (0 past `lengths`), and the
    number of new tokens including the stop token."""

    tokens: np.ndarray  # int32[N, max_new_tokens]
    logprobs: np.ndarray  # float32[N, max_new_tokens]
    lengths: np.ndarray  # int32[N]


class TextGenerationResult(NamedTuple):
    """`GenerationResult` plus the decoded text of each sample (without its stop token)."""

    texts: list[str]
    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray


# ----------------------------------------------------------------------------- buckets and the static plan


def prompt_bucket(length: int, multiple: int = 64) -> int:
    """Static prompt length: the next power of two (at least 8) up to `multiple`, then a multiple of it."""
    if length <= multiple:
        return max(8, 1 << max(0, int(length) - 1).bit_length())
    return -(-int(length) // multiple) * multiple


def batch_bucket(count: int, multiple_of: int = 1) -> int:
    """Static prompt-batch size: the next power of two, rounded up to a multiple of the data-parallel size."""
    size = 1 << max(0, int(count) - 1).bit_length()
    return -(-size // multiple_of) * multiple_of


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one compiled generate: shapes, sampling switches, shardings."""

    batch: int  # prompt rows (bucketed)
    prompt_len: int  # prompt length bucket
    n: int
    max_new: int
    cache_dtype: str
    greedy: bool
    top_k: int
    use_top_p: bool
    stop_slots: int  # stop ids travel as a -1-padded int32[stop_slots] argument (new ids compile nothing)
    pad_id: int
    share_prefix: bool
    row_sharding: NamedSharding | None
    cache_sharding: KVCache | None  # of NamedSharding, for the decode cache
    unstack: "_Unstack | None" = None  # run a scanned layer stack as separate layers (see `_unstack_layout`)
    per_layer_cache: bool = False  # one KV buffer per layer (when the layers run one by one)
    rules: Any = None  # logical-axis rules of activations and cache (with a mesh)

    @property
    def mesh(self) -> Mesh | None:
        return None if self.row_sharding is None else self.row_sharding.mesh

    @property
    def rows(self) -> int:
        return self.batch * self.n

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.max_new - 1  # the last sampled token is never fed back


class _Carry(NamedTuple):
    """Decode loop state (donated between prefill and decode)."""

    cache: KVCache
    tokens: jax.Array  # int32[N, max_new]
    logprobs: jax.Array  # float32[N, max_new]
    last: jax.Array  # int32[N] last sampled token (the next input)
    done: jax.Array  # bool[N]
    lengths: jax.Array  # int32[N]
    prompt_lens: jax.Array  # int32[N] real prompt tokens (the position of new token 0)
    prompt_idx: jax.Array  # int32[N]
    sample_idx: jax.Array  # int32[N]
    step: jax.Array  # int32[] tokens generated so far


@dataclasses.dataclass(frozen=True)
class _Unstack:
    """How to view a scanned model (layer params stacked `[L, ...]`) as its unscanned twin: the twin's graphdef
    and, per twin variable, (its path, the scanned path, the layer index or None)."""

    graphdef: nnx.GraphDef
    mapping: tuple[tuple[tuple, tuple, int | None], ...]


@functools.lru_cache(maxsize=64)
def _unstack_layout(model_type: type, config: Any, graphdef: nnx.GraphDef) -> _Unstack | None:
    """The unscanned twin of a scanned model, or None when the model is not scanned or its structure is not the
    expected one (then the scanned model runs as is).

    Why: inside the decode `while_loop`, XLA:CPU copies each layer's weights out of the stacked arrays at every
    step (a dynamic-slice feeding a dot); slicing them once per call outside the loop removes that traffic."""
    if not getattr(config, "scan_layers", False):
        return None
    try:
        twin = nnx.eval_shape(lambda: model_type(config.replace(scan_layers=False), rngs=nnx.Rngs(0)))
        scanned = nnx.eval_shape(lambda: model_type(config, rngs=nnx.Rngs(0)))
    except Exception:  # a model class without this constructor: run it scanned
        return None
    sgraph, sstate = nnx.split(scanned)
    if sgraph != graphdef:
        return None
    shapes = {path: v.get_value().shape for path, v in nnx.to_flat_state(sstate)}
    tgraph, tstate = nnx.split(twin)
    mapping = []
    for path, var in nnx.to_flat_state(tstate):
        if len(path) > 1 and path[0] == "layers" and isinstance(path[1], int):
            src, index = ("layers", *path[2:]), path[1]
            ok = src in shapes and shapes[src] == (config.num_layers, *var.get_value().shape)
        else:
            src, index = path, None
            ok = shapes.get(src) == var.get_value().shape
        if not ok:
            return None
        mapping.append((path, src, index))
    if {src for _, src, _ in mapping} != set(shapes):
        return None
    return _Unstack(tgraph, tuple(mapping))


def _merge(graphdef: nnx.GraphDef, state: nnx.State, unstack: _Unstack | None) -> nnx.Module:
    """The model from its split state (inside jit), per layer unstacked when `unstack` says how."""
    if unstack is None:
        return nnx.merge(graphdef, state)
    flat = dict(nnx.to_flat_state(state))
    pieces = []
    for path, src, index in unstack.mapping:
        var = flat[src]
        pieces.append((path, var if index is None else var.replace(var[...][index])))
    return nnx.merge(unstack.graphdef, nnx.from_flat_state(pieces))


# ----------------------------------------------------------------------------- device side (pure, jitted)


def _row_keys(rng: jax.Array, prompt_idx: jax.Array, sample_idx: jax.Array, step: jax.Array) -> jax.Array:
    """One key per row from (rng, prompt index, sample index, step): independent of batch layout."""
    def one(i, j):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, i), j), step)
    return jax.vmap(one)(prompt_idx, sample_idx)


def first_argmax(x: jax.Array) -> jax.Array:
    """int32 index of the first maximum along the last axis, as `jnp.argmax` (a NaN counts as the maximum).

    Why: XLA:CPU runs argmax's (value, index) pair reduction several times slower than a max followed by a min
    over matching indices, and it runs once per decoded token."""
    m = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((x == m) | jnp.isnan(x), idx, x.shape[-1]), axis=-1)


def _categorical(keys: jax.Array, z: jax.Array) -> jax.Array:
    """One draw per row of z[N, V] with that row's key: `jax.random.categorical` (argmax of z plus Gumbel noise,
    the same noise and so the same draws) with the faster argmax."""
    noise = jax.vmap(lambda key: jax.random.gumbel(key, z.shape[-1:], z.dtype))(keys)
    return first_argmax(noise + z)


def sample_logits(logits: jax.Array, keys: jax.Array, *, greedy: bool, top_k: int, use_top_p: bool,
                  temperature: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row of float32 logits[N, V] -> (int32[N], float32[N] log-prob under log_softmax(logits)).

    Filters apply to the temperature-scaled logits; the returned log-prob is always the raw temperature-1 one."""
    vocab = logits.shape[-1]
    if greedy:
        tok = first_argmax(logits)
    else:
        z = logits / temperature
        if top_k or use_top_p:
            k = min(top_k, vocab) if top_k else vocab
            vals, idx = jax.lax.top_k(z, k)
            if use_top_p:
                probs = jax.nn.softmax(vals, axis=-1)
                before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate: keeps the top one
                vals = jnp.where(before < top_p, vals, -jnp.inf)
            choice = _categorical(keys, vals)
            tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        else:
            tok = _categorical(keys, z)
    picked = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
    return tok, picked - jax.nn.logsumexp(logits, axis=-1)


def _constrain(x: Any, sharding: Any) -> Any:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _tracing(plan: _Plan):
    """Trace under the plan's activation sharding (and for its devices' platform) when it has a mesh."""
    return contextlib.nullcontext() if plan.mesh is None else parallel.activation_sharding(plan.mesh, plan.rules)


def _prefill(graphdef: nnx.GraphDef, plan: _Plan, state: nnx.State, ids: jax.Array, mask: jax.Array,
             prompt_idx: jax.Array, valid: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array,
             stops: jax.Array) -> _Carry:
    """Prefill the bucketed prompts once, broadcast the cache to n samples, sample token 0 -> decode carry."""
    with _tracing(plan):
        return _prefill_body(graphdef, plan, state, ids, mask, prompt_idx, valid, rng, temperature, top_p, stops)


def _prefill_body(graphdef, plan, state, ids, mask, prompt_idx, valid, rng, temperature, top_p, stops) -> _Carry:
    model = _merge(graphdef, state, plan.unstack)
    n = plan.n
    if not plan.share_prefix:
        ids, mask, prompt_idx, valid = (jnp.repeat(a, n, axis=0) for a in (ids, mask, prompt_idx, valid))
    rows = plan.rows
    cache = init_cache(model.config, ids.shape[0], plan.cache_len, plan.cache_dtype, plan.per_layer_cache)
    if plan.share_prefix and n == 1 or not plan.share_prefix:
        cache = _constrain(cache, plan.cache_sharding)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    hidden, cache = model.hidden_states(ids, mask, positions, cache, empty_cache=True)
    logits = model.logits(hidden[:, -1])  # left padding: the last column is every row's last real token
    prompt_lens = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    if plan.share_prefix and n > 1:
        rep = lambda a, axis=0: jnp.repeat(a, n, axis=axis)  # noqa: E731
        rep_kv = lambda a: tuple(rep(x) for x in a) if isinstance(a, tuple) else rep(a, 1)  # noqa: E731
        cache = KVCache(k=rep_kv(cache.k), v=rep_kv(cache.v), mask=rep(cache.mask), index=cache.index)
        cache = _constrain(cache, plan.cache_sharding)
        logits, prompt_lens, prompt_idx, valid = rep(logits), rep(prompt_lens), rep(prompt_idx), rep(valid)
    sample_idx = jnp.tile(jnp.arange(n, dtype=jnp.int32), plan.batch)
    step = jnp.zeros((), jnp.int32)
    keys = _row_keys(rng, prompt_idx, sample_idx, step)
    tok, lp = sample_logits(logits, keys, greedy=plan.greedy, top_k=plan.top_k, use_top_p=plan.use_top_p,
                            temperature=temperature, top_p=top_p)
    rows_c = lambda a: _constrain(a, plan.row_sharding)  # noqa: E731
    tokens = jnp.full((rows, plan.max_new), plan.pad_id, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((rows, plan.max_new), jnp.float32).at[:, 0].set(lp)
    done = ~valid | jnp.isin(tok, stops)
    return _Carry(cache=cache, tokens=rows_c(tokens), logprobs=rows_c(logprobs), last=rows_c(tok),
                  done=rows_c(done), lengths=rows_c(jnp.ones((rows,), jnp.int32)),
                  prompt_lens=rows_c(prompt_lens), prompt_idx=rows_c(prompt_idx), sample_idx=rows_c(sample_idx),
                  step=step + 1)


def _decode(graphdef: nnx.GraphDef, plan: _Plan, state: nnx.State, carry: _Carry, rng: jax.Array,
            temperature: jax.Array, top_p: jax.Array, stops: jax.Array) -> _Carry:
    """Feed the last token, sample the next, until every row stopped or `max_new` tokens exist."""
    with _tracing(plan):
        return _decode_body(graphdef, plan, state, carry, rng, temperature, top_p, stops)


def _decode_body(graphdef, plan, state, carry, rng, temperature, top_p, stops) -> _Carry:
    model = _merge(graphdef, state, plan.unstack)  # outside the loop: any weight slicing happens once per call
    head = model.head_weight()  # likewise the vocab projection's cast and layout
    ones = jnp.ones((plan.rows, 1), bool)

    def cond(c: _Carry) -> jax.Array:
        return (c.step < plan.max_new) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        positions = (c.prompt_lens + c.step - 1)[:, None]
        hidden, cache = model.hidden_states(c.last[:, None], ones, positions, c.cache)
        logits = model.logits(hidden[:, 0], head)
        keys = _row_keys(rng, c.prompt_idx, c.sample_idx, c.step)
        tok, lp = sample_logits(logits, keys, greedy=plan.greedy, top_k=plan.top_k, use_top_p=plan.use_top_p,
                                temperature=temperature, top_p=top_p)
        active = ~c.done
        tok = jnp.where(active, tok, plan.pad_id)
        lp = jnp.where(active, lp, 0.0)
        tokens = jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.step))
        logprobs = jax.lax.dynamic_update_slice(c.logprobs, lp[:, None], (0, c.step))
        return c._replace(cache=cache, tokens=tokens, logprobs=logprobs, last=tok,
                          done=c.done | (active & jnp.isin(tok, stops)),
                          lengths=c.lengths + active.astype(jnp.int32), step=c.step + 1)

    return jax.lax.while_loop(cond, body, carry)


_PREFILL = jax.jit(_prefill, static_argnums=(0, 1))
_DECODE = jax.jit(_decode, static_argnums=(0, 1), donate_argnums=(3,))


def compiled_cache_sizes() -> tuple[int, int]:
    """How many (prefill, decode) executables are compiled so far (one per graphdef and bucket)."""
    return _PREFILL._cache_size(), _DECODE._cache_size()


# ----------------------------------------------------------------------------- host side


def _check_prompts(prompts: Sequence[Sequence[int]], vocab: int, allow_empty: bool = False) -> list[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not (prompts or allow_empty):
        raise ValueError("prompts must be a non-empty list of token-id lists (e.g. [[1, 2, 3], [4, 5]])")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ValueError(f"prompt {i} is a string: generate() takes token ids; use generate_text() for strings")
        arr = np.asarray(p, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): check the tokenizer matches the model")
        out.append(arr.astype(np.int32))
    return out


def _batch_axes(mesh: Mesh | None) -> tuple[str, ...]:
    if mesh is None:
        return ()
    return tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)


def _on_cpu(mesh: Mesh | None) -> bool:
    """Whether generation runs on CPU devices (the mesh's, else jax's default)."""
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform == "cpu"


def _cache_dtype(params: SamplingParams, config: Any, mesh: Mesh | None) -> str:
    if params.kv_cache_dtype is not None:
        return params.kv_cache_dtype
    return canonical_dtype(config.dtype) if _on_cpu(mesh) else "bfloat16"


def _eos_ids(config: Any) -> tuple[int, ...]:
    eos = config.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def _stop_ids(params: SamplingParams, config: Any) -> tuple[int, ...]:
    """The ids that end a sequence: the params' stop ids plus, unless `ignore_eos`, the model's EOS ids."""
    eos = () if params.ignore_eos else _eos_ids(config)
    return tuple(sorted(set(params.stop_token_ids) | set(eos)))


def _make_plan(config: Any, num_prompts: int, max_prompt: int, params: SamplingParams,
               mesh: Mesh | None, unstack: _Unstack | None = None, rules: Any = None, batch: int | None = None) -> _Plan:
    axes = _batch_axes(mesh)
    dp = math.prod(mesh.shape[a] for a in axes) if axes else 1
    batch = batch_bucket(num_prompts, dp) if batch is None else int(batch)
    if batch * params.n == 1 and _on_cpu(mesh) and canonical_dtype(config.dtype) != "float32":
        # XLA:CPU lowers a 1-row bfloat16 dot to a slow naive loop; a second (discarded, already-stopped) row puts
        # every dot on the fast GEMM path.
        batch = 2
    prompt_len = prompt_bucket(max_prompt, params.bucket_multiple)
    pad = params.pad_token_id if params.pad_token_id is not None else config.pad_token_id
    stop_slots = max(4, batch_bucket(len(_stop_ids(params, config))))
    plan = _Plan(batch=batch, prompt_len=prompt_len, n=int(params.n), max_new=int(params.max_new_tokens),
                 cache_dtype=_cache_dtype(params, config, mesh), greedy=params.greedy, top_k=int(params.top_k),
                 use_top_p=float(params.top_p) < 1.0, stop_slots=stop_slots,
                 pad_id=int(pad if pad is not None else 0), share_prefix=bool(params.share_prefix),
                 row_sharding=None, cache_sharding=None, unstack=unstack,
                 per_layer_cache=unstack is not None or not getattr(config, "scan_layers", True))
    if mesh is None:
        return plan
    rules = parallel.inference_rules() if rules is None else tuple(rules)
    abstract = jax.eval_shape(lambda: init_cache(config, plan.rows, plan.cache_len, plan.cache_dtype,
                                                 plan.per_layer_cache))
    cache_sharding = parallel.cache_shardings(abstract, mesh, rules)
    row_sharding = NamedSharding(mesh, PartitionSpec(axes if axes else None))
    return dataclasses.replace(plan, row_sharding=row_sharding, cache_sharding=cache_sharding, rules=rules)


def _pad_prompts(prompts: list[np.ndarray], plan: _Plan, rows: int | None = None,
                 index: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Left-pad into [rows (default: the plan's batch), prompt_len]; filler rows hold one pad token and are marked
    invalid. `index`: each prompt's index (its samples' keys derive from it), default its position."""
    rows = plan.batch if rows is None else int(rows)
    ids = np.full((rows, plan.prompt_len), plan.pad_id, np.int32)
    mask = np.zeros((rows, plan.prompt_len), bool)
    for i, p in enumerate(prompts):
        ids[i, plan.prompt_len - len(p):] = p
        mask[i, plan.prompt_len - len(p):] = True
    mask[len(prompts):, -1] = True
    valid = np.arange(rows) < len(prompts)
    prompt_idx = np.arange(rows, dtype=np.int32)
    if index is not None:
        prompt_idx[:len(prompts)] = index
    return ids, mask, prompt_idx, valid


def _as_key(rng: Any) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def _to_host(x: jax.Array) -> np.ndarray:
    """The rows of `x` (split over processes along dim 0) this process holds, in order: its own prompts' rows."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    pieces: dict[int, Any] = {}
    for shard in x.addressable_shards:  # replicas of one slice (a tensor axis) are kept once
        pieces.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)])



def _prompt_sharding(plan: _Plan) -> NamedSharding | None:
    """Sharding of the prompt-batch inputs (ids, mask, prompt index, valid): rows over the batch axes."""
    return None if plan.mesh is None else NamedSharding(plan.mesh, PartitionSpec(plan.row_sharding.spec[0]))


def _setup(model_type: type, graphdef: nnx.GraphDef, config: Any, num_prompts: int, max_prompt: int,
           params: SamplingParams, mesh: Mesh | None, unstack_layers: bool | None, rules: Any,
           batch: int | None = None) -> _Plan:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if unstack_layers is None:
        unstack_layers = _on_cpu(mesh)
    unstack = _unstack_layout(model_type, config, graphdef) if unstack_layers else None
    return _make_plan(config, num_prompts, max_prompt, params, mesh, unstack, rules, batch)


class _Layout(NamedTuple):
    """Where this process's prompts go in a generate call whose mesh spans processes."""

    batch: int  # prompt rows of the whole call (every process's, with filler)
    local: int  # prompt rows this process feeds (its prompts, then filler)
    max_prompt: int  # the longest prompt of any process
    index: np.ndarray  # each of this process's prompts' index (keys derive from it)


def _across_processes(mesh: Mesh, prompts: list[np.ndarray], index: np.ndarray | None) -> _Layout:
    """Agree with the other processes on the call's shape (one small gather of counts and lengths); prompts without
    an explicit index are numbered after those of the blocks before this process's."""
    from capo_jax import multihost

    shards = multihost.shards(mesh)
    mine = len(shards.mine)
    seen = multihost.allgather(np.array([len(prompts), max((len(p) for p in prompts), default=1), shards.block],
                                        np.int64))
    local = batch_bucket(max(int(seen[:, 0].max()), 1), mine)
    if index is None:
        counts = {int(b): int(c) for c, _, b in seen[::-1]}  # a block's processes feed the same prompts
        index = sum(counts[b] for b in range(shards.block)) + np.arange(len(prompts))
    return _Layout(local * shards.count // mine, local, int(seen[:, 1].max()), np.asarray(index, np.int32))


def _scalars(params: SamplingParams, config: Any, plan: _Plan) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """(temperature, top_p, stop ids padded with -1) as the jitted functions take them."""
    temperature = jnp.float32(params.temperature if not params.greedy else 1.0)
    stop_ids = _stop_ids(params, config)
    stops = np.full((plan.stop_slots,), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    return temperature, jnp.float32(params.top_p), stops


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, rng: Any,
             mesh: Mesh | None = None, *, unstack_layers: bool | None = None, rules: Any = None,
             prompt_index: Sequence[int] | None = None) -> GenerationResult:
    """Sample `params.n` continuations of each token-id prompt; row `i * n + j` is sample j of prompt i.

    `model` is a `capo_jax.models.Transformer` (used as is: its current weights, dtype and layout; for a trained
    policy pass an `InferenceCopy`'s model). With `mesh`, rows go over the ('data', 'fsdp') axes, and activations
    and the cache follow `rules` (default `parallel.inference_rules()`: cache heads over 'tensor'). `rng` is a jax
    key (or an int seed). `unstack_layers` (default: on CPU) runs a scanned layer stack as separate layers,
    slicing the weights once per call inside the jitted functions instead of once per decode step.

    Sample j of prompt i draws from keys of (rng, prompt_index[i] (default i), j): give each prompt its index in a
    larger batch to sample it as that batch would. On a mesh spanning processes every process calls this with its
    own prompts (any count, none included) and gets its own rows back; prompts without `prompt_index` are numbered
    across the processes in the order of their row blocks (`capo_jax.multihost`)."""
    from capo_jax.multihost import replicated, spans_processes

    config = model.config
    multi = spans_processes(mesh)
    prompts = _check_prompts(prompts, config.vocab_size, allow_empty=multi)
    index = None if prompt_index is None else np.asarray(prompt_index, np.int64).reshape(-1)
    if index is not None and len(index) != len(prompts):
        raise ValueError(f"prompt_index has {len(index)} entries for {len(prompts)} prompts: give one per prompt")
    graphdef, state = nnx.split(model)
    if multi:
        layout = _across_processes(mesh, prompts, index)
        plan = _setup(type(model), graphdef, config, layout.batch, layout.max_prompt, params, mesh, unstack_layers,
                      rules, batch=layout.batch)
        inputs = _pad_prompts(prompts, plan, layout.local, layout.index)
        in_sharding = _prompt_sharding(plan)
        ids, mask, prompt_idx, valid = (jax.make_array_from_process_local_data(in_sharding, a) for a in inputs)
    else:
        plan = _setup(type(model), graphdef, config, len(prompts), max(len(p) for p in prompts), params, mesh,
                      unstack_layers, rules)
        ids, mask, prompt_idx, valid = _pad_prompts(prompts, plan, index=index)
        if mesh is not None:
            in_sharding = _prompt_sharding(plan)
            ids, mask, prompt_idx, valid = (jax.device_put(a, in_sharding) for a in (ids, mask, prompt_idx, valid))
    rng = _as_key(rng)
    temperature, top_p, stops = _scalars(params, config, plan)
    if multi:
        rng, temperature, top_p, stops = (replicated(mesh, x) for x in (rng, temperature, top_p, stops))
    carry = _PREFILL(graphdef, plan, state, ids, mask, prompt_idx, valid, rng, temperature, top_p, stops)
    carry = _DECODE(graphdef, plan, state, carry, rng, temperature, top_p, stops)
    rows = len(prompts) * plan.n
    return GenerationResult(tokens=_to_host(carry.tokens)[:rows], logprobs=_to_host(carry.logprobs)[:rows],
                            lengths=_to_host(carry.lengths)[:rows])


def lower_generate(model: nnx.Module, num_prompts: int, prompt_len: int, params: SamplingParams, mesh: Mesh, *,
                   rules: Any = None, unstack_layers: bool | None = None) -> tuple[Any, Any, Any]:
    """The (prefill, decode) programs `generate` would run for `num_prompts` prompts of up to `prompt_len` tokens,
    lowered for abstract inputs on `mesh`, and the decode loop's carry (ShapeDtypeStructs with shardings: its KV
    cache is `carry.cache`). `model` may be abstract (`nnx.eval_shape`, leaves ShapeDtypeStructs carrying their
    shardings). Compile the programs with `.compile()`; nothing runs."""
    config = model.config
    graphdef, state = nnx.split(model)
    plan = _setup(type(model), graphdef, config, num_prompts, prompt_len, params, mesh, unstack_layers, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    rows = _prompt_sharding(plan)
    shape = (plan.batch, plan.prompt_len)
    inputs = (jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows), jax.ShapeDtypeStruct(shape, bool, sharding=rows),
              jax.ShapeDtypeStruct((plan.batch,), jnp.int32, sharding=rows),
              jax.ShapeDtypeStruct((plan.batch,), bool, sharding=rows))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    stops = jax.ShapeDtypeStruct((plan.stop_slots,), jnp.int32, sharding=rep)
    prefill = _PREFILL.lower(graphdef, plan, state, *inputs, key, scalar, scalar, stops)
    shapes = prefill.out_info  # the carry's shapes, from the one trace
    carry_sharding = _Carry(cache=plan.cache_sharding, **{f: plan.row_sharding for f in _Carry._fields[1:-1]},
                            step=rep)
    carry = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, carry_sharding)
    decode = _DECODE.lower(graphdef, plan, state, carry, key, scalar, scalar, stops)
    return prefill, decode, carry


class InferenceCopy:
    """A model's weights in its compute dtype and an inference layout on `mesh` (default rules:
    `parallel.inference_rules()`), made from a live model by one jitted reshard: what the sampler should read in
    its decode loop, never FSDP-sharded float32 master weights (tunix keeps its rollout model the same way).

    `refresh(model)` makes a fresh copy from the model's current weights (once per RL step, after the update).
    KV heads that do not split evenly over the rules' `kv_heads` axes are repeated in the copy
    (`parallel.kv_head_repeats`). When the copy would equal the model (same dtype, layout and heads), `refresh`
    returns the model itself."""

    def __init__(self, model: nnx.Module, mesh: Mesh | None, rules: Any = None, *, donate: bool = False) -> None:
        from capo_jax.models.transformer import repeat_kv_heads

        self.mesh = mesh
        self.rules = parallel.inference_rules() if rules is None else tuple(rules)
        config = model.config
        repeats = parallel.kv_head_repeats(config.num_heads, config.num_kv_heads, mesh, self.rules)
        self.repeats = repeats
        self.config = config.replace(param_dtype=config.dtype, num_kv_heads=config.num_kv_heads * repeats)
        abstract = nnx.eval_shape(lambda: type(model)(self.config, rngs=nnx.Rngs(0)))
        self.graphdef, self._abstract = nnx.split(abstract)
        self.shardings = None if mesh is None else parallel.state_shardings(self._abstract, mesh, self.rules)
        dtype = jnp.dtype(config.dtype)

        def convert(state):
            state = jax.tree.map(lambda v: v.replace(v[...].astype(dtype)), state,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
            return repeat_kv_heads(config, state, repeats)[1]

        self._convert = jax.jit(convert, out_shardings=self.shardings, donate_argnums=(0,) if donate else ())

    def _unchanged(self, state: nnx.State) -> bool:
        """Whether the copy would hold exactly what `state` holds (dtype, heads and, with a mesh, sharding)."""
        if self.repeats != 1:
            return False
        leaves = jax.tree.leaves(state)
        targets = jax.tree.leaves(self.shardings) if self.shardings is not None else [None] * len(leaves)
        for x, s in zip(leaves, targets):
            if x.dtype != jnp.dtype(self.config.dtype):
                return False
            if s is not None and not x.sharding.is_equivalent_to(s, x.ndim):
                return False
        return True

    def refresh(self, model: nnx.Module) -> nnx.Module:
        """A model with `model`'s current weights in the copy's dtype, layout and heads."""
        state = nnx.state(model)
        if self._unchanged(state):
            return model
        return nnx.merge(self.graphdef, self._convert(state))

    def abstract(self) -> nnx.Module:
        """The copy as an abstract model (leaves ShapeDtypeStructs with their shardings), for `lower_generate`."""
        if self.shardings is None:
            return nnx.merge(self.graphdef, self._abstract)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self._abstract,
                             self.shardings)
        return nnx.merge(self.graphdef, state)


def generate_text(model: nnx.Module, tokenizer: Any, prompts: Sequence[str], params: SamplingParams, rng: Any,
                  mesh: Mesh | None = None, *, add_special_tokens: bool = True,
                  unstack_layers: bool | None = None, rules: Any = None,
                  prompt_index: Sequence[int] | None = None) -> TextGenerationResult:
    """`generate` on strings: encode with `tokenizer` (a transformers tokenizer), also stop at its EOS, and
    decode each sample without its stop token and special tokens."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string: wrap it as [prompt]")
    ids = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not params.ignore_eos:
        params = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + (int(eos),))
    result = generate(model, ids, params, rng, mesh, unstack_layers=unstack_layers, rules=rules,
                      prompt_index=prompt_index)
    stops = set(_stop_ids(params, model.config))
    texts = []
    for row, length in zip(result.tokens, result.lengths):
        out = [int(t) for t in row[: int(length)]]
        if out and out[-1] in stops:
            out = out[:-1]
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
    return TextGenerationResult(texts, *result)
