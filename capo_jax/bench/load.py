"""Load-time benchmark: `from_pretrained` on a random Qwen2.5-0.5B-shaped checkpoint, against the floor and transformers.

`python -m capo_jax.bench load` times `from_pretrained` on a random checkpoint of Qwen2.5-0.5B's shape,
next to the floor (reading every tensor byte) and transformers' own loader (when torch is installed).
The checkpoint is written to a temporary folder and removed afterwards."""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import tempfile
import time
import zlib

import jax
import ml_dtypes
import numpy as np

from capo_jax.models.safetensors_io import SafeTensorsFile, write_safetensors_streaming

QWEN25_05B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
    tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False, sliding_window=None,
    max_window_layers=21, bos_token_id=151643, eos_token_id=151643,
)


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a Qwen2-family HF checkpoint."""
    e, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = e // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (q, e), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, e), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (e, q),
            p + "mlp.gate_proj.weight": (m, e), p + "mlp.up_proj.weight": (m, e), p + "mlp.down_proj.weight": (e, m),
        })
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, e)
    return shapes


def write_random_checkpoint(folder: pathlib.Path, cfg: dict, dtype: str, shard_bytes: int = 2 * 10**9) -> int:
    """Random-valued safetensors (views of one random pool, so it is fast) + config.json; returns bytes."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    pool = (0.02 * np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32)).astype(np_dtype)
    shapes = hf_shapes(cfg)
    names, shards, size = list(shapes), [[]], 0
    for n in names:
        nbytes = int(np.prod(shapes[n])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    total, weight_map = 0, {}

    def produce(n: str) -> np.ndarray:  # one tensor at a time: memory stays at one tensor + the pool
        count = int(np.prod(shapes[n]))
        start = (zlib.crc32(n.encode()) % 7919) * 64
        return np.resize(pool[start:], count).reshape(shapes[n])

    for s, members in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors_streaming(folder / fname, [(n, shapes[n], np_dtype) for n in members], produce)
        weight_map.update({n: fname for n in members})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(dict(cfg, torch_dtype=dtype)))
    return total


def _timed_load(folder: pathlib.Path, dtype: str):
    """(model, seconds) for one from_pretrained call, waiting until every parameter is on device."""
    from flax import nnx

    from capo_jax.models import from_pretrained

    t = time.perf_counter()
    model = from_pretrained(folder, dtype=dtype)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return model, time.perf_counter() - t


def read_floor(folder: pathlib.Path) -> float:
    """Seconds to copy every tensor of the folder into memory once (the disk/page-cache floor)."""
    t = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        st = SafeTensorsFile(f)
        for k in st.keys():
            np.array(st.get(k))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m capo_jax.bench load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype stored in the random checkpoint (float32: ~2 GB for 0.5B)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="from_pretrained dtypes to time")
    ap.add_argument("--repeats", type=int, default=2, help="loads per dtype (the first includes compiles)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' (torch) loader")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smaller, faster run)")
    args = ap.parse_args(argv)

    from capo_jax.models import count_params

    cfg = dict(QWEN25_05B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory(prefix="capo_load_bench_") as tmp:
        folder = pathlib.Path(tmp)
        t = time.perf_counter()
        nbytes = write_random_checkpoint(folder, cfg, args.ckpt_dtype)
        print(f"wrote {nbytes / 1e9:.2f} GB {args.ckpt_dtype} checkpoint ({cfg['num_hidden_layers']} layers) "
              f"in {time.perf_counter() - t:.1f}s; devices: {jax.device_count()} x {jax.devices()[0].platform}")
        floor = read_floor(folder)
        print(f"floor: read every tensor once            {floor:6.2f}s  ({nbytes / 1e9 / floor:.2f} GB/s)")
        for dtype in args.dtypes.split(","):
            for r in range(args.repeats):
                gc.collect()
                model, secs = _timed_load(folder, dtype)
                n = count_params(model)
                print(f"capo_jax from_pretrained dtype={dtype:8s} run {r + 1}: {secs:6.2f}s  "
                      f"({n / 1e6:.0f}M params, {secs / floor:.2f}x floor)")
                del model
        if not args.no_peer:
            try:
                import torch
                import transformers
            except ImportError:
                print("peer: transformers/torch not installed, skipped")
                return 0
            torch.set_num_threads(os.cpu_count() or 1)
            for dtype in args.dtypes.split(","):
                gc.collect()
                t = time.perf_counter()
                model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
                secs = time.perf_counter() - t
                print(f"peer: transformers (torch) dtype={dtype:8s}  {secs:6.2f}s  ({secs / floor:.2f}x floor)")
                del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
