"""Hugging Face checkpoints in and out: `from_pretrained` reads config.json + safetensors into a Transformer
(placing each tensor straight onto its target sharding), `save_pretrained` writes a folder transformers loads.

Per-layer HF tensors are stacked into the scanned `[layers, ...]` parameters (or kept per layer when
`scan_layers=False`). Pickle files (`pytorch_model.bin`) are never opened.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from capo_jax import parallel
from capo_jax.models.config import ModelConfig, canonical_dtype
from capo_jax.models.safetensors_io import SafeTensorsFile, write_safetensors
from capo_jax.models.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
# HF keys a checkpoint may carry that hold no parameter of ours (non-persistent RoPE buffers of old exports).
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A Hugging Face folder that cannot be loaded as a capo_jax model; the message names the file or key."""


# ----------------------------------------------------------------------------- the name/layout mapping

# Our per-layer parameter path -> (HF key suffix under model.layers.{i}., layout kind). Our kernels keep HF's
# [out, in] order, split per head, so every conversion is a reshape (no transposes).
_LAYER_MAP = {
    "attn_norm.scale": ("input_layernorm.weight", "same"),
    "mlp_norm.scale": ("post_attention_layernorm.weight", "same"),
    "attn.q": ("self_attn.q_proj.weight", "merge_first2"),   # [n*D, E] <-> [n, D, E]
    "attn.k": ("self_attn.k_proj.weight", "merge_first2"),
    "attn.v": ("self_attn.v_proj.weight", "merge_first2"),
    "attn.o": ("self_attn.o_proj.weight", "merge_last2"),    # [E, H*D] <-> [E, H, D]
    "attn.q_bias": ("self_attn.q_proj.bias", "merge_first2"),  # [n*D] <-> [n, D]
    "attn.k_bias": ("self_attn.k_proj.bias", "merge_first2"),
    "attn.v_bias": ("self_attn.v_proj.bias", "merge_first2"),
    "attn.o_bias": ("self_attn.o_proj.bias", "same"),
    "attn.q_norm.scale": ("self_attn.q_norm.weight", "same"),
    "attn.k_norm.scale": ("self_attn.k_norm.weight", "same"),
    "mlp.gate": ("mlp.gate_proj.weight", "same"),
    "mlp.up": ("mlp.up_proj.weight", "same"),
    "mlp.down": ("mlp.down_proj.weight", "same"),
}
_GLOBAL_MAP = {
    "embed": ("model.embed_tokens.weight", "same"),
    "norm.scale": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "same"),
}


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape behind one of our per-layer shapes."""
    if kind == "merge_first2":
        return (shape[0] * shape[1], *shape[2:])
    if kind == "merge_last2":
        return (*shape[:-2], shape[-2] * shape[-1])
    return tuple(shape)


@dataclass(frozen=True)
class _Entry:
    """One of our Variables and the HF tensors that fill it (several when the layers are stacked)."""

    path: tuple
    hf_keys: tuple[str, ...]
    kind: str
    stacked: bool
    shape: tuple[int, ...]  # our per-layer shape


def _plan(flat: list[tuple[tuple, Any]], cfg: ModelConfig) -> list[_Entry]:
    """The HF keys and layouts behind every Variable of a flat model state."""
    plan = []
    for path, var in flat:
        names = [str(p) for p in path]
        shape = tuple(var.get_value().shape)
        if names[0] == "layers":
            if cfg.scan_layers:
                rel, layers, stacked, shape = ".".join(names[1:]), range(cfg.num_layers), True, shape[1:]
            else:
                rel, layers, stacked = ".".join(names[2:]), [int(names[1])], False
            suffix, kind = _LAYER_MAP[rel]
            keys = tuple(f"model.layers.{i}.{suffix}" for i in layers)
        else:
            key, kind = _GLOBAL_MAP[".".join(names)]
            keys, stacked = (key,), False
        plan.append(_Entry(tuple(path), keys, kind, stacked, shape))
    return plan


# ----------------------------------------------------------------------------- reading


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder, with a clear error when it is missing or malformed."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Hugging Face model folder needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def open_checkpoint(folder: str | os.PathLike) -> dict[str, SafeTensorsFile]:
    """Map every tensor name to its (memory-mapped) safetensors file; single-file, sharded+index, or several files."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory: pass a local Hugging Face model folder")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
    else:
        weight_map = None
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" It holds {pickles}: capo_jax never loads pickle files. Convert it once where you trust the "
                "file: transformers `AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)` "
                "writes safetensors.") if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights found.{hint}")
    files = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{index} lists {name}, which is missing from {folder}")
        files[name] = SafeTensorsFile(path)
    table: dict[str, SafeTensorsFile] = {}
    for name, f in files.items():
        for key in f.keys():
            if key in table:
                raise CheckpointError(f"tensor {key!r} appears in both {table[key].path.name} and {name}")
            table[key] = f
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in files[name].entries:
                raise CheckpointError(f"{index} puts {key!r} in {name}, but that file does not hold it")
    return table


def _check(plan: list[_Entry], table: dict[str, SafeTensorsFile], cfg: ModelConfig, folder: pathlib.Path) -> None:
    """Every needed key present with the right shape, and every checkpoint key used: else one clear error."""
    needed = {k for e in plan for k in e.hf_keys}
    missing = sorted(needed - table.keys())
    bad = []
    for e in plan:
        want = _hf_shape(e.kind, e.shape)
        for k in e.hf_keys:
            if k in table and tuple(table[k].shape(k)) != want:
                bad.append(f"{k} in {table[k].path.name}: checkpoint shape {tuple(table[k].shape(k))}, "
                           f"config.json implies {want}")
    ignorable = {k for k in table if _IGNORABLE.search(k)}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # a tied head some exporters write anyway; the embedding is used
    unused = sorted(set(table) - needed - ignorable)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_clip(missing)}")
    if bad:
        problems.append(f"shape mismatches ({len(bad)}): {_clip(bad)}")
    if unused:
        problems.append(f"keys the {cfg.model_type} mapping does not consume ({len(unused)}): {_clip(unused)}")
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match its config.json ({cfg.model_type}): "
                              + "; ".join(problems) + ". Check that config.json belongs to these weights.")


def _clip(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _host_value(e: _Entry, table: dict[str, SafeTensorsFile], dtype: np.dtype) -> np.ndarray:
    """The Variable's value in our layout and `dtype` as one fresh host array (per-layer tensors stacked).
    The cast happens here, on the host: NumPy/ml_dtypes casts faster than a per-shape compiled device cast,
    and a bfloat16 target halves the bytes sent to the device. The array is 64-byte aligned, which lets the CPU
    backend adopt it without another copy; it is never written again after this."""
    parts = [table[k].get(k).reshape(e.shape) for k in e.hf_keys]
    out = _aligned_empty((len(parts), *e.shape) if e.stacked else e.shape, dtype)
    if e.stacked:
        for i, part in enumerate(parts):
            out[i] = part  # casts while copying
    else:
        out[...] = parts[0]  # a copy: never keep a view into the memory map
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _place(host: np.ndarray, sharding: Any) -> jax.Array:
    """Put a host array on its target sharding; each device receives only its own slice."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def from_pretrained(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None, mesh: Any = None,
                    rules: parallel.Rules | None = None, **overrides: Any) -> Transformer:
    """Load a local Hugging Face Llama / Qwen2 / Qwen3 folder as a ready Transformer.

    `dtype` is the compute dtype (default float32), `param_dtype` the stored one (default: `dtype`).
    With `mesh`, every parameter goes straight to its sharding under `rules` (default: `policy_rules()`),
    so a model larger than one device still loads. `overrides` set other ModelConfig fields
    (`scan_layers=False`, `remat=True`, ...).
    """
    folder = pathlib.Path(path)
    table = open_checkpoint(folder)
    hf = read_hf_config(folder)
    dtype = canonical_dtype(dtype or "float32")
    param_dtype = canonical_dtype(param_dtype or dtype)
    try:
        cfg = ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype, **overrides)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    plan = _plan(flat, cfg)
    _check(plan, table, cfg, folder)
    if mesh is not None and rules is None:
        rules = parallel.policy_rules()
    filled = []
    for (p, var), e in zip(flat, plan):
        sharding = None
        if mesh is not None:
            sharding = parallel.logical_to_sharding(parallel.variable_names(var), mesh, rules, var.get_value().shape)
        host = _host_value(e, table, _numpy_dtype(cfg.param_dtype))
        filled.append((p, var.replace(_place(host, sharding))))
        del host
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ----------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (decimal units as in transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use an int (bytes) or a string like '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def _to_host(x: jax.Array, dtype: jnp.dtype) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one NumPy array in `dtype`."""
    x = x.astype(dtype) if x.dtype != dtype else x
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                    dtype: Any = None, max_shard_size: int | str = "5GB") -> pathlib.Path:
    """Write `model` as a Hugging Face folder (config.json, safetensors sharded with an index past
    `max_shard_size`, tokenizer files copied from `tokenizer_dir`) that transformers' AutoModelForCausalLM loads.
    `dtype` defaults to the model's param dtype. On multi-host runs every process must call it; process 0 writes."""
    cfg: ModelConfig = model.config
    dtype = jnp.dtype(canonical_dtype(dtype or cfg.param_dtype))
    out = pathlib.Path(out_dir)
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    plan = _plan(flat, cfg)
    if cfg.tie_word_embeddings:
        plan = [e for e in plan if e.hf_keys != ("lm_head.weight",)]
    writer = jax.process_index() == 0
    limit = parse_size(max_shard_size)
    # Assign whole Variables to shards by size (a stacked Variable's layers stay together).
    shards: list[list[int]] = [[]]
    used = 0
    for i, e in enumerate(plan):
        nbytes = len(e.hf_keys) * math.prod(e.shape) * dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += nbytes
    values = dict(flat)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            old.unlink(missing_ok=True)
    weight_map, total = {}, 0
    for s, members in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = []
        for i in members:
            e = plan[i]
            host = _to_host(values[e.path].get_value(), dtype)
            layers = host if e.stacked else [host]
            tensors += [(k, a.reshape(_hf_shape(e.kind, e.shape))) for k, a in zip(e.hf_keys, layers)]
        if writer:
            total += write_safetensors(out / name, tensors, {"format": "pt"})
        weight_map.update({k: name for k, _ in tensors})
    if writer:
        if len(shards) > 1:
            (out / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        hf = cfg.to_hf()
        hf["dtype"] = dtype.name
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files found in `src` to `dst`; error if there are none."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    found = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not any(n.startswith("tokenizer") or n in ("vocab.json",) for n in found):
        raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:6])}, ...) to copy")
    for n in found:
        if (src / n).resolve() != (dst / n).resolve():
            shutil.copyfile(src / n, dst / n)
    return found

