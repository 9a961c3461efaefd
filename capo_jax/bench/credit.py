"""Credit-path benchmark: the reward machinery against the cost of one policy forward on the same batch.

`python -m capo_jax.bench credit [--batch 512 --m 8 --steps 64 --seq 4096] [--quick]` times
1. `compute_credits` jitted (CAPO majority / group_token, and the GRPO baseline) on random
   fixed-shape inputs of the given size;
2. the host side per response: token-to-step map (`response_steps`, on a byte-level BPE trained
   here on synthetic solutions), critic prompt rendering, and parsing M critiques;
3. a forward pass of a Qwen2.5-0.5B-shaped `capo_jax.models.Transformer` (hidden 896, 24 layers,
   14 heads, 2 kv heads, MLP 4864, vocab 151936) on a small batch, extrapolated per token to
   batch x seq tokens. Per-token cost grows with sequence length (attention), so extrapolating
   from a shorter sequence UNDER-states the forward and makes the printed ratios conservative.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  attention_bias=True, max_position_embeddings=32768, model_type="qwen2")


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_credit_inputs(b: int, m: int, s: int, t: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Realistic shapes: ragged response lengths, steps increasing along each response, EOS outside steps."""
    rng = np.random.default_rng(seed)
    outcome = rng.integers(0, 2, b).astype(np.float32)
    votes = rng.random((b, m, s)) < 0.15
    valid = rng.random((b, m)) < 0.9
    lengths = rng.integers(t // 8, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    n_steps = rng.integers(1, s + 1, b)
    token_step = (np.arange(t)[None, :] * n_steps[:, None] // np.maximum(lengths[:, None], 1)).astype(np.int32)
    token_step = np.where(mask, np.minimum(token_step, s - 1), -1)
    token_step[np.arange(b), lengths - 1] = -1  # the EOS token
    return outcome, votes, valid, token_step, mask


def time_credits(b: int, m: int, s: int, t: int, group_size: int, reps: int) -> dict[str, float]:
    """Median seconds of one jitted compute_credits call per mode (inputs already on device)."""
    import jax

    from capo_jax.rewards.credit import compute_credits

    args = [jax.device_put(x) for x in random_credit_inputs(b, m, s, t)]
    out = {}
    for label, mode, vote, norm in (("capo majority/group_token", "capo", "majority", "group_token"),
                                    ("capo average/group_seq", "capo", "average", "group_seq"),
                                    ("grpo", "grpo", "majority", "group_token")):
        fn = jax.jit(functools.partial(compute_credits, group_size=group_size, vote=vote, w_whole=2.0,
                                       w_process=1.0, norm=norm, eps=1e-6, mode=mode))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        compile_s = time.perf_counter() - t0
        out[label] = _median_time(lambda: jax.block_until_ready(fn(*args)), reps)
        out[label + " (compile)"] = compile_s
    return out


_WORDS = ("we", "add", "the", "sum", "of", "both", "sides", "so", "then", "therefore", "substitute", "x", "y",
          "gives", "equation", "fraction", "café", "→", "≥", "√", "π", "😀")


def synthetic_response(rng: np.random.Generator, n_steps: int, words_per_step: int) -> str:
    steps = []
    for k in range(n_steps):
        words = rng.choice(_WORDS, words_per_step)
        nums = rng.integers(0, 1000, 4)
        steps.append(f"Step {k}: " + " ".join(words) + f" {nums[0]} + {nums[1]} = {nums[0] + nums[1]}, "
                     f"\\frac{{{nums[2]}}}{{{nums[3] + 1}}}.")
    return "\n\n".join(steps) + f"\n\nThe answer is \\boxed{{{rng.integers(0, 100)}}}."


def synthetic_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE trained here (no downloads) on the synthetic solutions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def time_host(n_responses: int, m: int, max_steps: int, steps_per_response: int,
              words_per_step: int) -> dict[str, float]:
    """Per-response seconds of the host side: token->step map, critic prompt, parsing m critiques."""
    from capo_jax.critic import parse_verdict, render_prompt
    from capo_jax.rewards.steps import response_steps

    rng = np.random.default_rng(1)
    texts = [synthetic_response(rng, steps_per_response, words_per_step) for _ in range(n_responses)]
    tokenizer = synthetic_tokenizer(texts)
    ids = [tokenizer.encode(x, add_special_tokens=False) + [tokenizer.eos_token_id] for x in texts]
    critique = "\n".join(f"Step {k}: the arithmetic is right." for k in range(steps_per_response))
    critiques = [critique + f"\nWrong step list: [{k % steps_per_response}, {(3 * k) % steps_per_response}]"
                 for k in range(m)]
    response_steps(ids[0], tokenizer, max_steps=max_steps)  # builds the per-tokenizer byte table once

    t0 = time.perf_counter()
    maps = [response_steps(x, tokenizer, max_steps=max_steps) for x in ids]
    t_steps = time.perf_counter() - t0
    t0 = time.perf_counter()
    prompts = [render_prompt("Compute the value.", sm.steps, reference="42") for sm in maps]
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    for sm in maps:
        for c in critiques:
            parse_verdict(c, len(sm.steps))
    t_parse = time.perf_counter() - t0
    del prompts
    return {"tokens per response": float(np.mean([len(x) for x in ids])),
            "steps per response": float(np.mean([len(sm.steps) for sm in maps])),
            "steps": t_steps / n_responses, "render": t_render / n_responses, "parse": t_parse / n_responses}


def time_forward(batch: int, seq: int, dtype: str, reps: int) -> tuple[float, int]:
    """Median seconds of one forward of the 0.5B-shaped model on [batch, seq] tokens, and its parameter count."""
    import jax
    import jax.numpy as jnp

    from capo_jax.models import ModelConfig, count_params, create_model, forward

    cfg = ModelConfig(**QWEN25_05B, dtype=dtype, param_dtype=dtype)
    model = create_model(cfg, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), bool)
    jax.block_until_ready(forward(model, ids, mask))
    return _median_time(lambda: jax.block_until_ready(forward(model, ids, mask)), reps), count_params(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m capo_jax.bench credit", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--m", type=int, default=8, help="critiques per response")
    ap.add_argument("--steps", type=int, default=64, help="max steps S")
    ap.add_argument("--seq", type=int, default=4096, help="response length T")
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--host_responses", type=int, default=64)
    ap.add_argument("--fwd_batch", type=int, default=1)
    ap.add_argument("--fwd_seq", type=int, default=256)
    ap.add_argument("--fwd_dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--skip_forward", action="store_true", help="do not time the 0.5B forward")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.seq, a.reps, a.host_responses, a.fwd_seq = 64, 512, 2, 8, 64
    if a.batch % a.group_size:
        ap.error(f"--batch {a.batch} must be a multiple of --group_size {a.group_size}")

    import jax

    from capo_jax.bench.peaks import load_average

    tokens = a.batch * a.seq
    print(f"credit benchmark on {jax.devices()[0].platform} x{len(jax.devices())}, "
          f"{os.cpu_count()} CPUs, load {load_average()}")
    print(f"batch B={a.batch}, critiques M={a.m}, steps S={a.steps}, tokens T={a.seq} "
          f"({tokens:,} token slots), group size {a.group_size}")

    credits = time_credits(a.batch, a.m, a.steps, a.seq, a.group_size, a.reps)
    host = time_host(a.host_responses, a.m, a.steps, steps_per_response=24, words_per_step=30)
    host_per_resp = host["steps"] + host["render"] + host["parse"]

    fwd_per_token = None
    if not a.skip_forward:
        fwd_s, n_params = time_forward(a.fwd_batch, a.fwd_seq, a.fwd_dtype, max(2, a.reps // 2))
        fwd_per_token = fwd_s / (a.fwd_batch * a.fwd_seq)
        fwd_full = fwd_per_token * tokens
        print(f"\n0.5B-shaped forward ({n_params / 1e6:.0f}M params, {a.fwd_dtype}): measured {fwd_s * 1e3:.0f} ms "
              f"on [{a.fwd_batch}, {a.fwd_seq}] = {fwd_per_token * 1e6:.1f} us/token")
        print(f"  EXTRAPOLATED per token to [{a.batch}, {a.seq}]: {fwd_full:,.0f} s "
              "(a lower bound: attention makes longer sequences cost more per token)")

    print("\ndevice side (jitted, median of", a.reps, "calls)")
    for label, sec in credits.items():
        if label.endswith("(compile)"):
            continue
        ratio = f"   {sec / fwd_full:.2e} of the forward" if fwd_per_token else ""
        print(f"  compute_credits {label:28s} {sec * 1e3:9.2f} ms  ({sec / tokens * 1e9:.2f} ns/token slot, "
              f"compile {credits[label + ' (compile)']:.1f} s){ratio}")

    print(f"\nhost side per response (~{host['tokens per response']:.0f} tokens, "
          f"{host['steps per response']:.0f} steps, M={a.m} critiques)")
    for key in ("steps", "render", "parse"):
        print(f"  {key:7s} {host[key] * 1e3:8.3f} ms")
    per_tok_host = host_per_resp / host["tokens per response"]
    batch_host = per_tok_host * tokens
    print(f"  total   {host_per_resp * 1e3:8.3f} ms/response = {per_tok_host * 1e6:.2f} us/token; "
          f"scaled to the batch ({tokens:,} tokens, one core): {batch_host:.1f} s")
    if fwd_per_token:
        print(f"\nratios to the extrapolated 0.5B forward over the same batch ({fwd_full:,.0f} s):")
        print(f"  credit (device): {credits['capo majority/group_token'] / fwd_full:.2e}")
        print(f"  host (steps + prompt + parse): {batch_host / fwd_full:.2e}")
    return 0
