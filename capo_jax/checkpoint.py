"""Training checkpoints with orbax: async save every N steps, keep the last K, resume from the latest.

A checkpoint holds three items: `params` and `opt_state` (sharded arrays, restored onto the
shardings of a target) and `meta` (JSON: step, RNG key data, the data source's position, the
host RNG streams). The workdir also keeps the run's config and the policy's Hugging Face config +
tokenizer (`policy_hf/`), so `load_policy` and the export command need nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
POLICY_HF_DIR = "policy_hf"
CONFIG_FILE = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")


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

    def restore(self, step: int | None, params_like: Any, opt_state_like: Any | None = None) -> dict[str, Any]:
        """Restore `step` (None: the latest) onto the shapes/shardings of the given trees; returns the items."""
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; have {self.all_steps()}")
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(_abstract(params_like)), "meta": ocp.args.JsonRestore()}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        out = {name: restored[name] for name in items}
        if opt_state_like is not None:  # orbax returns namedtuples as tuples: put back optax's own node types
            out["opt_state"] = jax.tree.unflatten(jax.tree.structure(opt_state_like), jax.tree.leaves(out["opt_state"]))
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


def load_policy(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None):
    """The trained policy (an NNX `Transformer`) from a workdir's checkpoint `step` (None: the latest), and the step.

    `dtype` is the compute dtype (default: the run's); parameters keep the run's master dtype. With
    `mesh`, parameters are restored straight onto their policy-rule shardings; else onto one device.
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
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (python -m capo_jax.train ...)")
        params = ckpt.restore(step, target)["params"]
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(params_state, params)
    rest = jax.tree.map(lambda x: x, rest)
    return nnx.merge(graphdef, params_state, rest), step

