"""Sampler benchmark: capo_jax `generate` against transformers' PyTorch `generate`, same weights, same run.

`python -m capo_jax.bench sampler [--batch 1,8,32] [--precision float32,bfloat16] [--mode greedy,sampled]
[--quick]` builds a random ~100M-parameter Qwen2-shaped model (hidden 768, 12 layers, 12 heads, 2 kv heads,
MLP 2048, vocab 32768, tied embeddings), saves it as a Hugging Face folder, and times exactly `--new` tokens
after `--prompt` prompt tokens on both sides. It also measures this machine's read bandwidth and matmul peaks
and prints, per row, generated tokens/s, the ratio, capo_jax's compile time (not in the throughput) and the
fraction of the roofline: min(bandwidth / bytes read per decode step x batch, matmul peak / FLOPs per token).
transformers runs in its own process (`capo_jax.bench.peer`), row by row alternating with capo_jax.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import tempfile
import time

_HERE = "capo_jax.bench.sampler"  # the peer process imports this module by name
SHAPE = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/jaxpr_trace_duration")


@dataclasses.dataclass
class Row:
    precision: str
    mode: str
    batch: int
    capo_tps: float
    torch_tps: float | None
    compile_s: float
    roofline_tps: float
    bound: str
    agree: float | None  # fraction of greedy rows whose tokens equal transformers' (float32 only)

    def line(self) -> str:
        torch_tps = "-" if self.torch_tps is None else f"{self.torch_tps:8.1f}"
        ratio = "-" if self.torch_tps is None else f"{self.capo_tps / self.torch_tps:5.2f}x"
        agree = "" if self.agree is None else f"  greedy rows equal {self.agree:.0%}"
        return (f"{self.precision:9s} {self.mode:8s} {self.batch:5d} {self.capo_tps:9.1f} {torch_tps:>9s} "
                f"{ratio:>7s} {self.compile_s:8.1f}s {self.capo_tps / self.roofline_tps:8.1%} ({self.bound}) "
                f"load {os.getloadavg()[0]:.1f}{agree}")


HEADER = ("precision mode     batch  capo t/s  torch t/s  ratio  compile   roofline")


def build_checkpoint(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Save a random Qwen2-shaped model of about 100M parameters (float32) as a Hugging Face folder."""
    import torch
    import transformers

    config = transformers.Qwen2Config(**SHAPE, max_position_embeddings=4096, rms_norm_eps=1e-6,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2, use_sliding_window=False)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def roofline(params: int, bytes_per: int, batch: int, ctx: float, peaks, precision: str) -> tuple[float, str]:
    """Upper bound on generated tokens/s for one decode step at `batch` rows with `ctx` cached tokens on average:
    the smaller of streaming the weights + KV cache once per step and doing the FLOPs at the matmul peak."""
    layers, kv, hd = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], SHAPE["hidden_size"] // SHAPE[
        "num_attention_heads"]
    q_dim = SHAPE["num_attention_heads"] * hd
    kv_bytes = batch * ctx * layers * 2 * kv * hd * bytes_per
    bw_tps = peaks.bandwidth_gbs * 1e9 / (params * bytes_per + kv_bytes) * batch
    # matmul FLOPs per token: every weight once (the tied embedding as the vocab projection) + attention
    flops = 2 * params + 4 * layers * ctx * q_dim
    peak = peaks.f32_gflops if precision == "float32" else peaks.bf16_gflops
    flop_tps = peak * 1e9 / flops
    return (bw_tps, "bandwidth") if bw_tps < flop_tps else (flop_tps, "matmul")


def time_capo(model, prompts, params, reps: int) -> tuple[float, float, "object"]:
    """(best seconds per generate call, compile seconds of the first call, the last result)."""
    import jax
    from jax._src import monitoring

    from capo_jax.sampling import generate

    spent = []

    def listener(event, duration, **kw):
        if event in COMPILE_EVENTS:
            spent.append(duration)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        result = generate(model, prompts, params, jax.random.key(0))
    finally:
        monitoring.unregister_event_duration_listener(listener)
    best = float("inf")
    for r in range(reps):
        start = time.perf_counter()
        result = generate(model, prompts, params, jax.random.key(r + 1))
        best = min(best, time.perf_counter() - start)
    return best, sum(spent), result


def torch_load(state: dict, folder: str, precision: str) -> None:
    """Load the transformers model in the peer process (PyTorch runs apart from XLA: `capo_jax.bench.peer`)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    state.pop("model", None)
    state["model"] = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, precision)).eval()


def torch_info(state: dict) -> str:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return f"torch {torch.__version__} threads {torch.get_num_threads()} (own process)"


def time_torch(state: dict, prompts, new: int, sampled: bool, reps: int) -> tuple[float, "object"]:
    """(best seconds per transformers generate call with KV cache, exactly `new` tokens, the last output's new
    tokens as a NumPy array). Runs in the peer process on the model `torch_load` put there."""
    import torch

    model = state["model"]
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=sampled, max_new_tokens=new, min_new_tokens=new, use_cache=True,
              pad_token_id=2)
    if sampled:
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    with torch.inference_mode():
        model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        best, out = float("inf"), None
        for _ in range(reps):
            start = time.perf_counter()
            out = model.generate(ids, **kw)
            best = min(best, time.perf_counter() - start)
    return best, out[:, len(prompts[0]):].numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capo_jax.bench sampler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--precision", default="float32,bfloat16", help="float32 and/or bfloat16")
    parser.add_argument("--mode", default="greedy,sampled", help="greedy and/or sampled (temperature 1)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new", type=int, default=128, help="new tokens, exactly (default 128)")
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions per row (best is kept)")
    parser.add_argument("--quick", action="store_true", help="batch 1,8, 32 new tokens, rough peaks")
    parser.add_argument("--no-torch", action="store_true", help="time capo_jax only")
    parser.add_argument("--xla-flags", default=None, help="extra XLA_FLAGS (set before jax starts)")
    parser.add_argument("--checkpoint", default=None, help="reuse/keep the Hugging Face folder here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.new = "1,8" if args.batch == "1,8,32" else args.batch, min(args.new, 32)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    batches = [int(b) for b in args.batch.split(",") if b]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    for p in precisions:
        if p not in ("float32", "bfloat16"):
            parser.error(f"--precision {p!r}: use float32 and/or bfloat16")
    for m in modes:
        if m not in ("greedy", "sampled"):
            parser.error(f"--mode {m!r}: use greedy and/or sampled")

    import jax
    import numpy as np

    from capo_jax.bench.peaks import load_average, measure_peaks
    from capo_jax.models import count_params
    from capo_jax.models.hf_io import from_pretrained
    from capo_jax.sampling import SamplingParams

    from capo_jax.bench.peer import Peer

    peer = None if args.no_torch else Peer()
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), "
          f"{peer.call(_HERE + ':torch_info') if peer else 'no torch'}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {load_average()}")
    peaks = measure_peaks(quick=args.quick)
    for line in peaks.rows():
        print("  " + line)

    tmp = None
    if args.checkpoint:
        folder = pathlib.Path(args.checkpoint)
        if not (folder / "config.json").exists():
            build_checkpoint(folder)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="capo_bench_sampler_")
        folder = build_checkpoint(pathlib.Path(tmp.name))
    rng = np.random.default_rng(0)
    ctx = args.prompt + args.new / 2
    rows: list[Row] = []
    print(f"prompt {args.prompt} tokens, exactly {args.new} new tokens; tokens/s = batch x new / wall time "
          f"(prefill included)\n{HEADER}")
    for precision in precisions:
        model = from_pretrained(folder, dtype=precision)
        n_params = count_params(model)
        bytes_per = 4 if precision == "float32" else 2
        if peer is not None:
            peer.call(_HERE + ":torch_load", str(folder), precision)
        for mode in modes:
            params = SamplingParams(temperature=0.0 if mode == "greedy" else 1.0, max_new_tokens=args.new,
                                    ignore_eos=True)
            for batch in batches:
                prompts = rng.integers(3, SHAPE["vocab_size"], size=(batch, args.prompt)).tolist()
                seconds, compile_s, result = time_capo(model, prompts, params, args.reps)
                torch_tps, agree = None, None
                if peer is not None:
                    t_seconds, ref = peer.call(_HERE + ":time_torch", prompts, args.new, mode == "sampled", args.reps)
                    torch_tps = batch * args.new / t_seconds
                    if mode == "greedy" and precision == "float32":
                        agree = float(np.mean(np.all(ref == result.tokens, axis=1)))
                bound_tps, bound = roofline(n_params, bytes_per, batch, ctx, peaks, precision)
                row = Row(precision, mode, batch, batch * args.new / seconds, torch_tps, compile_s, bound_tps, bound,
                          agree)
                rows.append(row)
                print(row.line(), flush=True)
        del model
    print(f"params {n_params / 1e6:.1f}M; load average {load_average()}")
    if peer is not None:
        peer.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
