"""Training checkpoints with orbax: async save every N steps, keep the last K, resume from the latest.

A checkpoint holds three items: `params` and `opt_state` (sharded arrays, restored onto the
shardings of a target) and `meta` (JSON: step, RNG key data, the data source's position, the
host RNG streams). The workdir also keeps the run's config and the policy's Hugging Face config +
tokenizer (`policy_hf/`), so `load_policy` and the export command need nothing else.

A checkpoint that does not restore (a truncated array file, an empty metadata file, a missing
item) raises `CheckpointError`, one line naming its step, path and the reason; `restore_newest`
falls back to the newest one that restores and moves the broken ones aside (never deletes them).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
POLICY_HF_DIR = "policy_hf"
CONFIG_FILE = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")


BROKEN_PREFIX = "broken-"  # checkpoints/broken-<step>-<time>: a checkpoint moved aside (orbax lists only integer names)


class CheckpointError(RuntimeError):
    """A checkpoint that does not restore; the message is one line: its step, its path and the reason."""

    def __init__(self, step: int, path: str, reason: str) -> None:
        super().__init__(f"checkpoint step {step} at {path} does not restore: {reason}")
        self.step, self.path, self.reason = step, path, reason


def failure_reason(exc: BaseException, limit: int = 240) -> str:
    """One line saying why a restore failed: the innermost cause's type and first line, without TensorStore's spec dump."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    inner = seen[-1]
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    for cut in (" [tensorstore_spec", " See full TensorStore details"):
        text = text.split(cut, 1)[0]
    text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    return text if len(text) <= limit else text[: limit // 3] + " ... " + text[-(limit - limit // 3 - 5):]


def _late_callback_noise(unraisable: Any) -> bool:
    """Whether an unraisable exception is TensorStore finishing a read for a restore that already failed: its
    callback finds orbax's event loop closed. Harmless, and printed once per pending array otherwise."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))


_FAILED_PATHS: set[str] = set()  # step directories whose restore failed in this process (see _UnretrievedReadNoise)


class _UnretrievedReadNoise(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of reads from a checkpoint whose restore already failed
    and was reported in one line: orbax leaves its other pending reads unawaited, and each would print a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        first_line = str(record.msg).split("\n", 1)[0]
        if exc is None or not first_line.endswith("exception was never retrieved"):
            return True
        return not any(os.path.join(path, "") in str(exc) for path in _FAILED_PATHS)


# The RuntimeWarning orbax's array and metadata reads raise when a failed restore leaves them never awaited.
UNAWAITED_READ_WARNING = r"coroutine '(_read_array_index_and_device_put|Store\._get_array_metadatas)' was never awaited"


def _silence_late_callbacks() -> None:
    """Drop `_late_callback_noise` from sys.unraisablehook (once per process; everything else still reaches the old
    hook), and the warnings about orbax's array and metadata reads that a failed restore leaves never awaited."""
    previous = sys.unraisablehook
    if getattr(previous, "_capo_filter", False):
        return
    warnings.filterwarnings("ignore", category=RuntimeWarning, message=UNAWAITED_READ_WARNING)

    def hook(unraisable: Any) -> None:
        if not _late_callback_noise(unraisable):
            previous(unraisable)

    hook._capo_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")  # once, even when someone else replaced the hook since (pytest does)
    if not any(isinstance(f, _UnretrievedReadNoise) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadNoise())


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding of each array: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
    """Save/restore (params, opt_state, meta) under `workdir/checkpoints/<step>`."""

    def __init__(self, workdir: str, *, keep: int = 3, every: int = 1, async_save: bool = True) -> None:
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), enable_async_checkpointing=bool(async_save),
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether the periodic schedule saves at `step`."""
        return step % self.every == 0

    def save(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any]) -> None:
        """Start writing a checkpoint of `step` (in the background when async); skips a step already saved."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            force=True,
        )

    def step_path(self, step: int) -> str:
        """The directory of checkpoint `step`."""
        return os.path.join(self.directory, str(int(step)))

    def restore(self, step: int | None, params_like: Any, opt_state_like: Any | None = None) -> dict[str, Any]:
        """Restore `step` (None: the latest) onto the shapes/shardings of the given trees; returns the items.

        Raises FileNotFoundError when there is no such step and CheckpointError when it does not restore.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; have {self.all_steps()}")
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(_abstract(params_like)), "meta": ocp.args.JsonRestore()}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        _silence_late_callbacks()  # a failing restore leaves reads pending whose callbacks find the loop closed
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            out = {name: restored[name] for name in items}
            if not isinstance(out["meta"], dict):
                raise ValueError(f"meta is {type(out['meta']).__name__}, not a JSON object")
        except Exception as exc:  # noqa: BLE001 - orbax/TensorStore raise many types; each means "does not restore"
            _FAILED_PATHS.add(self.step_path(step))
            raise CheckpointError(step, self.step_path(step), failure_reason(exc)) from exc
        if opt_state_like is not None:  # orbax returns namedtuples as tuples: put back optax's own node types
            out["opt_state"] = jax.tree.unflatten(jax.tree.structure(opt_state_like), jax.tree.leaves(out["opt_state"]))
        return out

    def move_aside(self, step: int) -> str:
        """Rename checkpoint `step` to `broken-<step>-<time>` next to it (out of orbax's listing); returns the new path."""
        src = self.step_path(step)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dst, n = os.path.join(self.directory, f"{BROKEN_PREFIX}{int(step)}-{stamp}"), 1
        while os.path.exists(dst):
            n += 1
            dst = os.path.join(self.directory, f"{BROKEN_PREFIX}{int(step)}-{stamp}-{n}")
        if os.path.exists(src):
            os.rename(src, dst)
        self.manager.reload()
        return dst

    def restore_newest(self, params_like: Any, opt_state_like: Any | None = None, *,
                       check: Callable[[dict[str, Any]], None] | None = None, move_aside: bool = True,
                       log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The items of the newest checkpoint that restores (and passes `check`) plus its `step`; None when there is none.

        Newer ones that fail are reported in one line each and, with `move_aside` (process 0 moves), renamed
        to `broken-<step>-<time>`, so the run goes on from the good one and can save those steps again.
        When none restores (more likely a changed config than corruption), nothing is moved and the
        newest one's CheckpointError is raised.
        """
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        failed: list[CheckpointError] = []
        for step in self._steps_everywhere():
            error = None
            try:
                out = self._restore_checked(step, params_like, opt_state_like, check)
            except (CheckpointError, FileNotFoundError) as exc:
                error = exc if isinstance(exc, CheckpointError) else CheckpointError(step, self.step_path(step), str(exc))
            error = self._agreed(step, error)
            if error is not None:
                failed.append(error)
                continue
            for exc in failed:
                moved = f"; moved aside to {self.move_aside(exc.step)}" if move_aside and jax.process_index() == 0 else ""
                log(f"[checkpoint] {exc}{moved}")
            if failed:
                log(f"[checkpoint] falling back to step {step}, the newest checkpoint that restores")
                if move_aside and jax.process_count() > 1:  # every process lists what process 0 left, or a later
                    from capo_jax.multihost import barrier  # save of a moved step would run on some of them only

                    barrier("checkpoint-moved-aside")
                    self.manager.reload()
            return {**out, "step": step}
        if failed:
            newest = failed[0]
            others = f" (nor do steps {', '.join(str(e.step) for e in failed[1:])})" if failed[1:] else ""
            raise CheckpointError(newest.step, newest.path, f"{newest.reason}{others}; if the config changed, use a new "
                                  f"workdir, else move the broken checkpoints out of {self.directory}")
        return None

    def _steps_everywhere(self) -> list[int]:
        """The steps to try, newest first: process 0's listing on every process (a lagging file system view elsewhere
        then fails that step on the lagging process, and `_agreed` fails it everywhere)."""
        steps = sorted(self.all_steps(), reverse=True)
        if jax.process_count() == 1:
            return steps
        from capo_jax.multihost import allgather_objects

        return allgather_objects(steps)[0]

    def _agreed(self, step: int, error: CheckpointError | None) -> CheckpointError | None:
        """This step's failure as every process sees it: a step that failed on any process failed on all, so that
        they all resume from the same step (one process going on from an older one would hang the next collective)."""
        if jax.process_count() == 1:
            return error
        from capo_jax.multihost import allgather_objects

        reasons = allgather_objects(None if error is None else error.reason)
        if error is None:
            bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
            if bad:
                return CheckpointError(step, self.step_path(step), f"on process {bad[0][0]}: {bad[0][1]}")
        return error

    def _restore_checked(self, step: int, params_like: Any, opt_state_like: Any | None,
                         check: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        out = self.restore(step, params_like, opt_state_like)
        if check is not None:
            try:
                check(out)
            except Exception as exc:  # noqa: BLE001 - a checkpoint whose contents fail the check is broken too
                raise CheckpointError(step, self.step_path(step), failure_reason(exc)) from exc
        return out

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# RNG state as JSON


def key_to_json(key: jax.Array) -> list[int]:
    """A JAX PRNG key as a list of ints (its raw key data)."""
    data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(v) for v in np.asarray(data).reshape(-1)]


def key_from_json(values: list[int]) -> jax.Array:
    """Rebuild the typed PRNG key written by `key_to_json`."""
    return jax.random.wrap_key_data(np.asarray(values, dtype=np.uint32))


# ---------------------------------------------------------------------------------------------
# Files of the run kept next to the checkpoints


def save_run_files(workdir: str, config_dict: Mapping[str, Any], policy_dir: str, hf_config: Mapping[str, Any]) -> None:
    """Write the run's config and the policy's HF config + tokenizer files into the workdir (once)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(config_dict), f, indent=2, sort_keys=True)
    out = os.path.join(workdir, POLICY_HF_DIR)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    if policy_dir and os.path.isdir(policy_dir):
        for name in _TOKENIZER_FILES:
            src = os.path.join(policy_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out, name))


def load_run_config(workdir: str) -> dict:
    """The config a run in `workdir` was started with (as a plain dict)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a capo_jax training workdir")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_policy(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
                log: Callable[[str], None] | None = None):
    """The trained policy (an NNX `Transformer`) from a workdir's checkpoint `step` (None: the latest), and the step.

    `dtype` is the compute dtype (default: the run's); parameters keep the run's master dtype. With
    `mesh`, parameters are restored straight onto their policy-rule shardings; else onto one device.
    With `step` None a checkpoint that does not restore is reported (through `log`) and the one before
    it is used; an explicit `step` that does not restore raises CheckpointError.
    """
    from flax import nnx

    from capo_jax.models import ModelConfig, Transformer

    hf_dir = os.path.join(workdir, POLICY_HF_DIR)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir}/config.json not found: {workdir!r} is not a capo_jax training workdir")
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    run = load_run_config(workdir)
    param_dtype = run.get("policy", {}).get("param_dtype", "float32")
    cfg = ModelConfig.from_hf(hf, dtype=dtype or run.get("optim", {}).get("compute_dtype", "float32"), param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params_state, rest = nnx.split(abstract, nnx.Param, ...)
    target = nnx.to_pure_dict(params_state)
    if mesh is not None:
        from capo_jax.parallel import logical_to_sharding, policy_rules

        specs = nnx.to_pure_dict(nnx.get_partition_spec(params_state))
        target = jax.tree.map(lambda a, names: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=logical_to_sharding(names, mesh, policy_rules())),
                              target, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    else:
        device = jax.devices()[0]
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), target)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if step is not None:
            params = ckpt.restore(int(step), target)["params"]  # an explicit step that does not restore raises, one line
        else:
            if ckpt.latest_step() is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (python -m capo_jax.train ...)")
            restored = ckpt.restore_newest(target, move_aside=False, log=log)  # a reader: reports, never moves
            params, step = restored["params"], restored["step"]
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(params_state, params)
    rest = jax.tree.map(lambda x: x, rest)
    return nnx.merge(graphdef, params_state, rest), step

