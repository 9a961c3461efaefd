"""Meshes (`data`, `fsdp`, `tensor`), logical-axis rules per role, and sharding a model's state or a batch.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...). A *rules* table maps each logical name
to mesh axes; each role (policy, reference, critic) picks its own table. Divisibility policy: when the mesh
axes a rule names do not divide a dimension, that dimension falls back to replication (trailing mesh axes
are dropped first, so `('data', 'fsdp')` can shrink to `('data',)`) -- tiny test models have odd sizes.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# One rule: logical axis name -> mesh axis, tuple of mesh axes, or None (replicated).
Rules = tuple[tuple[str, Any], ...]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation); one size may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1 (fill)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available: adjust the sizes or set one to -1")
    if _cores_as_devices(devices):  # jax's torus mapping refuses these (it needs one device per chip): take them
        # in their given order, which libtpu gives chip by chip
        return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _cores_as_devices(devices: Sequence[Any]) -> bool:
    """Whether some chip shows as more than one device (a v4 / v5p topology's TensorCores, each its own device, as
    libtpu compiling ahead of time gives them): `jax.make_mesh` cannot lay those onto the physical torus."""
    chips = [(getattr(d, "process_index", 0), tuple(d.coords)) for d in devices if getattr(d, "coords", None) is not None]
    return len(set(chips)) < len(chips)


def mesh_from_config(cfg: Mapping[str, Any] | Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh from any mapping/ConfigDict with optional `data`, `fsdp`, `tensor` sizes."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    return make_mesh(get("data", -1), get("fsdp", 1), get("tensor", 1), devices=devices)


def policy_rules() -> Rules:
    """Trainable policy: FSDP over `fsdp` on the embed dim, tensor parallel over heads / mlp / vocab."""
    return (
        ("batch", BATCH_AXES),
        ("length", None),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("head_vocab", ("tensor", "data", "fsdp")),  # the vocab projection in a vocab-parallel loss
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),
        ("norm", None),
    )


def inference_rules() -> Rules:
    """Frozen inference roles (reference, critic): tensor parallel over heads / mlp / vocab, replicated over
    `data` and `fsdp` (no all-gathers of weights per step)."""
    return (
        ("batch", BATCH_AXES),
        ("length", None),
        ("embed", None),
        ("vocab", "tensor"),
        ("head_vocab", ("tensor", "data", "fsdp")),  # the vocab projection in a vocab-parallel loss
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),
        ("norm", None),
    )


# The rule sets a config names (mesh.policy_rules, mesh.rollout_rules, ...): name -> a function returning them.
RULES = {"policy": policy_rules, "inference": inference_rules}


def _as_tuple(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `names`. Names without a rule are replicated; with `mesh` and `shape`, mesh axes
    that are absent, already used by an earlier dim, or do not divide the dim are dropped (replication)."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for d, name in enumerate(names):
        axes = [a for a in _as_tuple(table.get(name)) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if a in mesh.shape and mesh.shape[a] > 1]
            if shape is not None:
                while axes and shape[d] % math.prod(mesh.shape[a] for a in axes):
                    axes.pop()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def logical_to_sharding(names: Sequence[str | None] | None, mesh: Mesh, rules: Rules,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for logical `names` (give `shape` to get the divisibility fallback)."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def variable_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a Variable carries (None if it has none)."""
    meta = var.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding_names")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """A pytree like `state` (an nnx.State or Variables) whose leaves are each Variable's NamedSharding."""
    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(logical_to_sharding(variable_names(v), mesh, rules, v.get_value().shape))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model: nnx.Module, mesh: Mesh, rules: Rules) -> Any:
    """Target shardings of `model`'s whole state (use as jit in/out shardings of `nnx.split` state)."""
    return state_shardings(nnx.state(model), mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Move every Variable of `model` to its rule-derived sharding on `mesh` (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_spec(ndim: int, mesh: Mesh, dim0: int | None = None, axes: Sequence[str] = BATCH_AXES) -> PartitionSpec:
    """Spec sharding dim 0 over `axes` (trailing axes dropped while they do not divide `dim0`), rest replicated."""
    names = [a for a in axes if a in mesh.shape and mesh.shape[a] > 1]
    if dim0 is not None:
        while names and dim0 % math.prod(mesh.shape[a] for a in names):
            names.pop()
    lead = None if not names else names[0] if len(names) == 1 else tuple(names)
    return PartitionSpec(lead, *([None] * (ndim - 1))) if ndim else PartitionSpec()


def batch_sharding(x: Any, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """NamedSharding for one array `x` (or ShapeDtypeStruct) with its batch dim over `axes`."""
    shape = np.shape(x) if not hasattr(x, "shape") else x.shape
    return NamedSharding(mesh, batch_spec(len(shape), mesh, shape[0] if shape else None, axes))


def shard_batch(batch: Any, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> Any:
    """Put every array of a pytree on `mesh`, leading (batch) dim over ('data', 'fsdp'); scalars replicated."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(x, mesh, axes)), batch)


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a `KVCache`: k/v `[layers, batch, kv_heads, length, head_dim]` (or a tuple of per-layer
    buffers without the layer axis), mask `[batch, length]`."""
    from capo_jax.models.cache import CACHE_AXES

    def one(field: str, x: Any) -> Any:
        if isinstance(x, tuple):
            return tuple(logical_to_sharding(CACHE_AXES[field][1:], mesh, rules, a.shape) for a in x)
        return logical_to_sharding(CACHE_AXES[field], mesh, rules, x.shape)

    return type(cache)(**{f: one(f, getattr(cache, f)) for f in cache._fields})


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


_ACTIVATIONS = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, the model pins its activations (batch over `('data', 'fsdp')`, logits'
    vocab per `rules`) with sharding constraints, so GSPMD all-gathers FSDP weights rather than resharding
    activations. Outside it, `constrain` is a no-op."""
    previous = getattr(_ACTIVATIONS, "value", None)
    _ACTIVATIONS.value = (mesh, rules)
    try:
        yield
    finally:
        _ACTIVATIONS.value = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from logical `names` under the active `activation_sharding`, else `x`."""
    active = getattr(_ACTIVATIONS, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(names, mesh, rules, x.shape))


def relayout(x: jax.Array, names: Sequence[str | None], source_names: Sequence[str | None]) -> jax.Array:
    """`x` (laid out by `source_names`) constrained to the layout of logical `names` under the active
    `activation_sharding` (else `x`), with its cotangent constrained back to the source layout.

    Why: the transpose of a plain sharding constraint pins the cotangent to the same (compute) layout; this one
    leaves the gradient in the layout its source lives in (the vocab-parallel head's gradient goes straight back
    to the embedding's FSDP layout, a chunk's hidden-state gradient to its rows)."""
    active = getattr(_ACTIVATIONS, "value", None)
    if active is None:
        return x
    mesh, rules = active
    # both layouts are resolved here, once, and travel as static arguments: the backward may be traced after the
    # `activation_sharding` block has ended (a `jax.vjp` whose pullback runs later) and must not read the context
    return _relayout(x, logical_to_sharding(names, mesh, rules, x.shape),
                     logical_to_sharding(source_names, mesh, rules, x.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _relayout(x, target, source):
    return jax.lax.with_sharding_constraint(x, target)


def _relayout_fwd(x, target, source):
    return _relayout(x, target, source), None


def _relayout_bwd(target, source, _, g):
    return (jax.lax.with_sharding_constraint(g, source),)


_relayout.defvjp(_relayout_fwd, _relayout_bwd)


def gather_weight(x: jax.Array, names: Sequence[str | None] | None, dtype: Any = None) -> jax.Array:
    """A parameter's value for compute: cast to `dtype` (default: its own) and, under `activation_sharding`, laid
    out as the rules say minus the batch axes (FSDP's all-gather, in the compute dtype, before each use). Its
    gradient comes back in the parameter's dtype and stored layout: summed over devices in that dtype by a
    reduce-scatter, never gathered.

    Why: left to itself, XLA met FSDP weights split along a matmul's contracting dim by summing partial products
    of activation size around the ring instead of gathering the (smaller) weight."""
    dtype = x.dtype if dtype is None else jax.numpy.dtype(dtype)
    active = getattr(_ACTIVATIONS, "value", None)
    if active is None or names is None:
        return x.astype(dtype)
    mesh, rules = active
    stored = logical_to_sharding(names, mesh, rules, x.shape)
    entries = []
    for entry in stored.spec:
        axes = tuple(a for a in _as_tuple(entry) if a not in BATCH_AXES)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    compute = PartitionSpec(*entries)
    if compute == stored.spec:  # not split over a batch axis: nothing to gather
        return x.astype(dtype)
    return _gather(x, stored, NamedSharding(mesh, compute), dtype, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gather(x, stored, compute, dtype, source_dtype):
    return jax.lax.with_sharding_constraint(x.astype(dtype), compute)


def _gather_fwd(x, stored, compute, dtype, source_dtype):
    return _gather(x, stored, compute, dtype, source_dtype), None


def _gather_bwd(stored, compute, dtype, source_dtype, _, g):
    return (jax.lax.with_sharding_constraint(g.astype(source_dtype), stored),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` (None outside one)."""
    active = getattr(_ACTIVATIONS, "value", None)
    return None if active is None else active[0]


def active_axis_size(name: str) -> int:
    """How many ways the active `activation_sharding` splits logical axis `name` (1 outside one)."""
    active = getattr(_ACTIVATIONS, "value", None)
    return 1 if active is None else axis_size(active[0], active[1], name)


def target_platform() -> str:
    """The platform the program being traced will run on: the active mesh's devices (a TPU topology compiled on a
    CPU host says 'tpu'), else jax's default backend."""
    mesh = active_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def axis_size(mesh: Mesh, rules: Rules, name: str) -> int:
    """How many ways `rules` split the logical axis `name` on `mesh` (before any divisibility fallback)."""
    table = dict(rules)
    return math.prod(mesh.shape[a] for a in _as_tuple(table.get(name)) if a in mesh.shape)


def kv_head_repeats(num_heads: int, num_kv_heads: int, mesh: Mesh | None, rules: Rules) -> int:
    """How many times to repeat each KV head so the `kv_heads` axis splits evenly over the mesh axes the rules
    give it (1 when it already does, or when no repetition also keeps the query heads grouped evenly).

    Why: 8 KV heads cannot split 16 ways, and replicating them puts every head's KV cache on every device.
    Repeating each head r times (an exact rewrite of grouped-query attention) gives each device whole heads."""
    if mesh is None:
        return 1
    ways = axis_size(mesh, rules, "kv_heads")
    if ways <= 1 or num_kv_heads % ways == 0:
        return 1
    r = ways // math.gcd(num_kv_heads, ways)
    return r if num_heads % (num_kv_heads * r) == 0 else 1
