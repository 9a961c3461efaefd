"""Several processes (SPMD, one per host): which rows of a batch this process holds on a mesh, and the few host-side
collectives the loop needs (gather per-row values, agree on a flag, wait at a barrier). With one process every
helper is the identity, with no collective.

A mesh's batch axes split the rows of a batch into `dp` equal shards; a process holds the shards its devices hold
(a TPU host's devices need not be neighbours on the mesh, so its shards need not be contiguous). Processes whose
devices hold the same shards form one *block* (they must feed the same rows); blocks are numbered by their first
shard.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from capo_jax.parallel import BATCH_AXES


def process_count() -> int:
    """How many processes the job has (1 without jax.distributed)."""
    return jax.process_count()


def is_lead() -> bool:
    """Whether this is process 0: the one that writes logs, metrics and run files."""
    return jax.process_index() == 0


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether `mesh` has devices of more than one process (its programs are collective: every process calls them)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


# ----------------------------------------------------------------------------- rows of a batch on a mesh


@dataclasses.dataclass(frozen=True)
class Shards:
    """How a mesh's batch axes split a batch's rows among processes."""

    count: int  # dp: equal row shards of a batch
    mine: tuple[int, ...]  # the shards this process's devices hold, ascending
    blocks: tuple[tuple[int, ...], ...]  # the distinct shard sets of the processes, ordered by their first shard

    @property
    def block(self) -> int:
        """This process's block: its position among the distinct shard sets."""
        return self.blocks.index(self.mine)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def batch_axes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """The batch axes of `mesh` that split rows (present and larger than 1)."""
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def shards(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> Shards:
    """Which row shards each process holds when a batch's rows go over `axes` of `mesh`."""
    names = batch_axes(mesh, axes)
    count = math.prod(mesh.shape[a] for a in names) if names else 1
    sharding = NamedSharding(mesh, PartitionSpec(names if names else None))
    held: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((count,)).items():
        held.setdefault(device.process_index, set()).add(index[0].start or 0)
    sets = {p: tuple(sorted(s)) for p, s in held.items()}
    me = jax.process_index()
    if me not in sets:
        raise ValueError(f"process {me} has no device on this mesh: every process must own part of a mesh it runs on")
    if len({len(s) for s in sets.values()}) != 1:
        raise ValueError(f"the mesh gives processes unequal numbers of row shards ({ {p: len(s) for p, s in sets.items()} }): "
                         "use mesh sizes that split every process's devices the same way")
    distinct = sorted(set(sets.values()))
    for a, b in itertools.combinations(distinct, 2):
        if set(a) & set(b):
            raise ValueError("two processes hold overlapping but different row shards: use a mesh whose batch axes "
                             "split whole processes")
    return Shards(count, sets[me], tuple(distinct))


def local_rows(total: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> np.ndarray:
    """The global indices of the rows of a `total`-row batch this process holds, in the order its local data lists
    them (ascending: what `jax.make_array_from_process_local_data` expects)."""
    s = shards(mesh, axes)
    if total % s.count:
        raise ValueError(f"a batch of {total} rows does not split into {s.count} equal shards")
    size = total // s.count
    return np.concatenate([np.arange(k * size, (k + 1) * size) for k in s.mine]).astype(np.int64)


def local_groups(total: int, group: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> np.ndarray:
    """The groups (of `group` consecutive rows) of a `total`-row batch whose rows this process holds; each must be
    whole on it (a prompt's samples are sampled by one process)."""
    rows = local_rows(total, mesh, axes).reshape(-1, group)
    starts = rows[:, 0]
    if np.any(starts % group) or np.any(rows != starts[:, None] + np.arange(group)):
        s = shards(mesh, axes)
        raise ValueError(f"a batch of {total // group} prompts x {group} samples over {s.count} row shards splits a "
                         f"prompt's samples between processes: make the prompt count a multiple of {s.count}")
    return starts // group


def share(count: int, mesh: Mesh | None = None) -> tuple[int, int]:
    """This process's contiguous share [lo, hi) of `count` items: by its block of `mesh` when the mesh spans
    processes, else by its process index (each process then works alone). Shares differ by at most one item."""
    if spans_processes(mesh):
        s = shards(mesh)
        index, parts = s.block, s.num_blocks
    else:
        index, parts = jax.process_index(), jax.process_count()
    return count * index // parts, count * (index + 1) // parts


def replicated(mesh: Mesh, x: Any) -> jax.Array:
    """A host value that every process holds alike (a number, a NumPy array, a PRNG key) as an array replicated
    on `mesh`: what `jax.device_put` cannot do for a value committed to one device when the mesh spans processes."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(x)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


# ----------------------------------------------------------------------------- host-side collectives


def allgather(x: Any) -> np.ndarray:
    """Every process's `x` (same shape and dtype on all), stacked: [processes, ...] in process order."""
    x = np.asarray(x)
    if process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (its bytes padded to a power of two: few compiled shapes)."""
    if process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = allgather(np.int64(data.size))
    width = 1 << max(int(sizes.max()), 1).bit_length()
    padded = np.zeros(width, np.uint8)
    padded[:data.size] = data
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(allgather(padded), sizes)]


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (each process calls this at the same point)."""
    return bool(allgather(np.int32(bool(flag))).any())


def gather_rows(values: dict[str, np.ndarray], rows: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """Per-row arrays of the whole `total`-row batch from each process's rows (`rows`: their global indices; the
    same count on every process); processes holding the same rows agree on them."""
    if process_count() == 1 and len(rows) == total:
        return {k: np.asarray(v)[np.argsort(rows)] for k, v in values.items()}
    index = allgather(np.asarray(rows, np.int64)).reshape(-1)
    out = {}
    for key, v in values.items():
        v = np.asarray(v)
        got = allgather(v).reshape(-1, *v.shape[1:])
        full = np.zeros((total, *v.shape[1:]), v.dtype)
        full[index] = got
        out[key] = full
    if len(np.unique(index)) != total:
        raise ValueError(f"the processes' rows cover {len(np.unique(index))} of {total} rows")
    return out


def gather_blocks(obj: Any, mesh: Mesh | None = None) -> list[Any]:
    """Each block's JSON-able `obj` in block order (one per block; see `share`): the pieces of a result split by
    `share`, to put back together."""
    if process_count() == 1:
        return [obj]
    if spans_processes(mesh):
        index = shards(mesh).block
    else:
        index = jax.process_index()
    got = {}
    for block, piece in allgather_objects([index, obj]):
        got.setdefault(block, piece)
    return [got[b] for b in sorted(got)]


def gather_lists(values: dict[str, list], mesh: Mesh | None = None) -> dict[str, list]:
    """Each key's list joined over the blocks in block order (see `share`): per-item results of a split, whole."""
    pieces = gather_blocks(values, mesh)
    return {k: [v for piece in pieces for v in piece[k]] for k in values}


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process gets here (through the coordinator, no device collective: it may wait for long)."""
    if process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    key = f"capo_jax/{name}/{next(_BARRIERS)}"
    if client is None:  # a job without jax.distributed's client (not expected): a device collective instead
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(key)
        return
    client.wait_at_barrier(key, int(timeout_s * 1000))
