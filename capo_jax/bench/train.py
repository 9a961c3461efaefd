"""Training-update benchmark: capo_jax's jitted PPO update against PyTorch's, on the same weights.

`python -m capo_jax.bench train` builds a ~100M-parameter Qwen2-shaped model (hidden 768, 12 layers,
12 heads, 2 kv heads, MLP 2048, vocab 32768, tied) with transformers, saves it, loads it into
capo_jax, and times one update (forward, backward, AdamW) on 4 x 1024 tokens in: PyTorch float32,
capo_jax float32 and capo_jax bfloat16 compute (float32 master weights and optimizer state). It
prints tokens/s, ratios, model FLOPs utilisation against matmul peaks measured in the same run, the
loss curves of the three runs, and the share of wall time per phase of full CAPO steps of the demo.
PyTorch runs in its own process (`capo_jax.bench.peer`); `--order` times the runs in blocks or round-robin.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable

import numpy as np

from capo_jax.bench.peer import Peer

_HERE = "capo_jax.bench.train"  # the peer process imports this module by name

# The model under test: Qwen2-shaped, ~98M parameters with the tied embedding.
HF_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True, max_position_embeddings=2048,
                 rms_norm_eps=1e-6, rope_theta=1000000.0)
OPTIM = dict(learning_rate=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
             grad_clip=1.0)
CLIP = 0.2


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark batch: `batch` rows of `prompt` + `response` tokens, `steps` updates per run."""

    batch: int = 4
    prompt: int = 128
    response: int = 896
    steps: int = 3
    chunk: int = 128  # trainer's log-prob chunk (divides `response`)

    @property
    def tokens(self) -> int:
        return self.batch * (self.prompt + self.response)


@dataclasses.dataclass
class Run:
    """Wall time and loss of every update of one run (the first includes compilation / warm-up)."""

    name: str
    times: list[float]
    losses: list[float]

    def tokens_per_s(self, tokens: int) -> float:
        timed = self.times[1:] or self.times
        return tokens / float(np.median(timed))


def step_flops(cfg: dict, w: Workload) -> float:
    """Model FLOPs of one update: 6 x matmul params x tokens (LM head on response positions only)
    plus 6 x the full-square attention score/value matmuls (the usual MFU convention)."""
    h, layers, heads, kv = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * cfg["intermediate_size"]
    seq = w.prompt + w.response
    dense = 6 * layers * per_layer * w.batch * seq
    head = 6 * h * cfg["vocab_size"] * w.batch * w.response
    attention = 6 * layers * 2 * heads * d * seq * seq * w.batch
    return float(dense + head + attention)


# ----------------------------------------------------------------------------- inputs


def save_weights(folder: str, seed: int = 0) -> None:
    """Random Qwen2 weights with transformers (float32 safetensors), the shared starting point."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_CONFIG)).float()
    model.save_pretrained(folder)


def make_batch(w: Workload, vocab: int, seed: int = 0, num_critiques: int = 4, max_steps: int = 8) -> dict[str, np.ndarray]:
    """A rollout batch in the trainer's format: random tokens, outcomes, steps and votes (one group)."""
    rng = np.random.default_rng(seed)
    b, t = w.batch, w.response
    step_len = t // max_steps
    return {
        "prompt_ids": rng.integers(0, vocab, (b, w.prompt), dtype=np.int32),
        "prompt_mask": np.ones((b, w.prompt), bool),
        "response_ids": rng.integers(0, vocab, (b, t), dtype=np.int32),
        "response_mask": np.ones((b, t), bool),
        "token_step": np.minimum(np.arange(t) // step_len, max_steps - 1)[None].repeat(b, 0).astype(np.int32),
        "outcome": (np.arange(b) % 2).astype(np.float32),
        "votes": rng.random((b, num_critiques, max_steps)) < 0.3,
        "vote_valid": np.ones((b, num_critiques), bool),
        "sampler_logp": np.zeros((b, t), np.float32),
    }


def step_options(w: Workload):
    """The trainer's static step options for the benchmark: one mini-batch, one micro-batch, sampler log-probs,
    logits kept for the backward pass (`rl.logprob_remat=False`, as PyTorch keeps them; 0.5 GB here)."""
    from capo_jax.rl.train_step import StepOptions

    return StepOptions(group_size=w.batch, micro_batch_size=w.batch, logprob_chunk=w.chunk, logprob_remat=False,
                       old_logprob_source="sampler", reward_mode="capo", vote="majority")


def advantages(batch: dict[str, np.ndarray], w: Workload) -> np.ndarray:
    """The credit function's per-token advantages of the batch (what both frameworks optimise)."""
    import jax

    from capo_jax.rl.train_step import compute_advantages

    out = jax.jit(lambda b: compute_advantages(b, step_options(w)))(batch)
    return np.asarray(out["advantages"])


# ----------------------------------------------------------------------------- PyTorch


def torch_old_logp(state: dict, folder: str, batch: dict[str, np.ndarray], w: Workload) -> np.ndarray:
    """Log-probs of the response tokens under the initial weights (the 'sampler' log-probs). Runs in the peer."""
    import torch
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logp = _torch_logp(model, batch, w)
    return logp.numpy()


def _torch_logp(model, batch: dict[str, np.ndarray], w: Workload):
    import torch

    ids = torch.from_numpy(np.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)).long()
    logits = model(input_ids=ids, logits_to_keep=w.response + 1).logits[:, :-1].float()
    target = torch.from_numpy(batch["response_ids"]).long()
    return torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]


def torch_setup(state: dict, folder: str, batch: dict[str, np.ndarray], adv: np.ndarray, w: Workload) -> None:
    """Build the PyTorch float32 update in the peer process (`torch_step` runs it): the same PPO-clip
    token-mean loss, AdamW, global-norm clip."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    old = torch.from_numpy(np.array(batch["sampler_logp"], np.float32))
    a = torch.from_numpy(np.array(adv, np.float32))
    mask = torch.from_numpy(batch["response_mask"]).float()

    def update() -> float:
        ratio = torch.exp(_torch_logp(model, batch, w) - old)
        pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
        loss = (pg * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        opt.step()
        return loss.item()

    state["update"] = update


def torch_step(state: dict) -> float:
    """One PyTorch update in the peer process; returns its loss."""
    return state["update"]()


# ----------------------------------------------------------------------------- capo_jax


def jax_update(folder: str, batch: dict[str, np.ndarray], w: Workload, compute_dtype: str) -> Callable[[], float]:
    """A capo_jax update (returns its loss) through the trainer's real jitted step
    (`capo_jax.rl.train_step.PolicyTrainer`: credits, chunked log-probs, PPO-clip, AdamW)."""
    import jax

    from capo_jax import parallel
    from capo_jax.models import from_pretrained
    from capo_jax.rl.train_step import PolicyTrainer, make_optimizer

    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    model = from_pretrained(folder, dtype=compute_dtype, param_dtype="float32", mesh=mesh,
                            rules=parallel.policy_rules())
    optimizer, _ = make_optimizer(types.SimpleNamespace(**OPTIM), w.steps)
    trainer = PolicyTrainer(model, step_options(w), optimizer, mesh)
    key = jax.random.key(0)

    def update() -> float:
        metrics = trainer.step(batch, key)
        return float(jax.block_until_ready(metrics["train/loss"]))

    return update


def time_runs(updates: dict[str, Callable[[], float]], steps: int, order: str = "blocks",
              between: Callable[[], None] | None = None) -> list[Run]:
    """Time `steps` updates of each run. `blocks`: each run's updates back to back, as in a training loop;
    `interleaved`: round-robin, one update of each per round, so a drifting load weighs on all alike (but each
    update then starts from the other runs' memory state: 23.2 s vs 20.4 s per capo_jax float32 update here).
    `between` runs after each block or round."""
    if order not in ("blocks", "interleaved"):
        raise ValueError(f"order={order!r}: use blocks or interleaved")
    runs = {name: Run(name, [], []) for name in updates}
    groups = [[name] * steps for name in updates] if order == "blocks" else [list(updates)] * steps
    for group in groups:
        for name in group:
            start = time.perf_counter()
            loss = updates[name]()
            runs[name].times.append(time.perf_counter() - start)
            runs[name].losses.append(loss)
        if between is not None:
            between()
    return list(runs.values())


# ----------------------------------------------------------------------------- matmul probe


def matmul_grad_probe(tokens: int = 4096, reps: int = 5) -> list[tuple[str, float]]:
    """GFLOP/s of forward + backward of one MLP-sized matmul [tokens, 768] x [2048, 768]^T (the model's
    [out, in] kernel layout) through the model's own einsum, in float32 and in bf16 (whose backward dots
    also take bfloat16 operands): how close single matmuls come to the measured peaks."""
    import jax
    import jax.numpy as jnp

    from capo_jax.bench.peaks import best_time
    from capo_jax.models.einsum import einsum

    h, m = HF_CONFIG["hidden_size"], HF_CONFIG["intermediate_size"]
    x = jax.random.normal(jax.random.key(0), (tokens, h), jnp.float32)
    w = 0.03 * jax.random.normal(jax.random.key(1), (m, h), jnp.float32)
    variants = [
        ("float32", lambda x, w: einsum("te,me->tm", x, w, jnp.float32), x),
        ("bf16 (bf16 backward)", lambda x, w: einsum("te,me->tm", x, w, jnp.bfloat16), x.astype(jnp.bfloat16)),
    ]
    out = []
    for name, fn, xin in variants:
        grad = jax.jit(jax.grad(lambda w, x, fn=fn: jnp.sum(jnp.square(fn(x, w).astype(jnp.float32))), argnums=(0, 1)))
        out.append((name, 6 * tokens * h * m / best_time(grad, w, xin, reps=reps) / 1e9))
    return out


# ----------------------------------------------------------------------------- CAPO step phases


def bootstrap_cache() -> str:
    """Where the demo's bootstrapped policy is kept between benchmark runs (it takes minutes to train)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "capo_jax", "bench_demo_bootstrap")


def phase_shares(steps: int, timeout: float) -> dict[str, float] | str:
    """Run `steps` steps of configs/demo.py through the trainer in a subprocess and read its phase times.

    The workdir is fresh each time; its `bootstrap` folder links to a cache, so the supervised warm
    start of the demo policy is trained once (the trainer retrains it if the demo settings change)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = os.path.join(root, "configs", "demo.py")
    cache = bootstrap_cache()
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        os.symlink(cache, os.path.join(workdir, "bootstrap"))
        cmd = [sys.executable, "-m", "capo_jax.train", "--config", config, f"--config.workdir={workdir}",
               f"--config.total_steps={steps}", "--config.eval.every=0"]
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"demo run timed out after {timeout:.0f}s"
        if proc.returncode != 0:
            return f"demo run failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        return _read_phase_times(workdir)


def _read_phase_times(workdir: str) -> dict[str, float] | str:
    """Sum the `time/<phase>` metrics of the run's metrics.jsonl after the first (compiling) step."""
    from capo_jax.metrics import read_metrics

    try:
        rows = read_metrics(workdir)
    except FileNotFoundError:
        return "the demo run wrote no JSONL metrics"
    rows = [r for r in rows if any(k.startswith("time/") for k in r)]
    totals: dict[str, float] = {}
    for row in rows[1:] if len(rows) > 1 else rows:
        for k, v in row.items():
            if k.startswith("time/") and k != "time/step" and isinstance(v, (int, float)):
                totals[k[len("time/"):]] = totals.get(k[len("time/"):], 0.0) + float(v)
    return totals or "the demo run logged no time/* metrics"


# ----------------------------------------------------------------------------- report


def _curve(run: Run) -> str:
    return " ".join(f"{x:+.6f}" for x in run.losses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capo_jax.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 x 512 tokens, 3 updates per run, 2 demo steps")
    parser.add_argument("--precision", choices=("both", "float32", "bfloat16"), default="both",
                        help="which capo_jax compute dtypes to time")
    parser.add_argument("--steps", type=int, default=None, help="updates per run (the first one is not timed)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch run")
    parser.add_argument("--no-phases", action="store_true", help="skip the CAPO step phase breakdown")
    parser.add_argument("--phase-steps", type=int, default=None, help="demo steps for the phase breakdown")
    parser.add_argument("--order", choices=("blocks", "interleaved"), default="blocks",
                        help="blocks: each run's updates back to back (steady state, as in training); interleaved: "
                             "round-robin (fair under a drifting load, but each update inherits the others' memory state)")
    parser.add_argument("--no-probe", action="store_true", help="skip the matmul forward + backward probe")
    args = parser.parse_args(argv)

    import jax

    from capo_jax.bench.peaks import load_average, measure_matmul

    w = Workload(batch=2, prompt=64, response=448, steps=3, chunk=64) if args.quick else Workload()
    if args.steps:
        w = dataclasses.replace(w, steps=max(2, args.steps))
    dtypes = ("float32", "bfloat16") if args.precision == "both" else (args.precision,)
    print(f"capo_jax train benchmark: jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, load average {load_average()} (other work on this machine skews timings)")
    import jax.numpy as jnp

    size = 1024 if args.quick else 2048
    flops = step_flops(HF_CONFIG, w)
    print(f"model: Qwen2-shaped {HF_CONFIG['hidden_size']}h x {HF_CONFIG['num_hidden_layers']}L, vocab "
          f"{HF_CONFIG['vocab_size']}; batch {w.batch} x ({w.prompt} prompt + {w.response} response) = {w.tokens} "
          f"tokens; {flops / w.tokens / 1e9:.2f} GFLOP/token per update; {w.steps} updates per run, "
          f"order {args.order}, the first (compilation, warm-up) untimed")

    peaks: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    loads: list[str] = []

    def measure_round() -> None:
        """Matmul peaks and load between rounds: this shared machine's load changes by the minute."""
        peaks["float32"].append(measure_matmul(jnp.float32, size=size, reps=3))
        peaks["bfloat16"].append(measure_matmul(jnp.bfloat16, jnp.float32, size=size, reps=3))
        loads.append(load_average().split()[0])
        print(f"  {'run' if args.order == 'blocks' else 'round'} {len(loads)} done, load {loads[-1]}", flush=True)

    with tempfile.TemporaryDirectory() as folder, Peer() as peer:
        save_weights(folder)
        batch = make_batch(w, HF_CONFIG["vocab_size"])
        batch["sampler_logp"] = peer.call(f"{_HERE}:torch_old_logp", folder, batch, w)
        adv = advantages(batch, w)
        updates = {}
        if not args.no_torch:
            peer.call(f"{_HERE}:torch_setup", folder, batch, adv, w)
            updates["pytorch float32"] = lambda: peer.call(f"{_HERE}:torch_step")
        for dtype in dtypes:
            updates[f"capo_jax {dtype}"] = jax_update(folder, batch, w, dtype)
        runs = time_runs(updates, w.steps, args.order, measure_round)
    peak = {k: float(np.median(v[1:] or v)) for k, v in peaks.items()}
    print(f"matmul peaks (median): float32 {peak['float32']:.0f} GFLOP/s, bfloat16->float32 "
          f"{peak['bfloat16']:.0f} GFLOP/s; load averages after each block or round: {', '.join(loads)}")

    base = next((r for r in runs if r.name.startswith("pytorch")), None)
    print(f"\n{'run':<22}{'tokens/s':>10}{'vs torch':>10}{'s/update':>10}{'first':>8}{'MFU f32 peak':>14}{'MFU bf16 peak':>15}")
    for r in runs:
        tps = r.tokens_per_s(w.tokens)
        ratio = f"{tps / base.tokens_per_s(w.tokens):.2f}x" if base else "-"
        achieved = tps * flops / w.tokens / 1e9
        print(f"{r.name:<22}{tps:>10.1f}{ratio:>10}{w.tokens / tps:>10.2f}{r.times[0]:>8.1f}"
              f"{100 * achieved / peak['float32']:>13.1f}%{100 * achieved / peak['bfloat16']:>14.1f}%")
    print("\nloss per update (PPO-clip token mean on the credit function's advantages, same batch every update):")
    for r in runs:
        print(f"  {r.name:<20} {_curve(r)}")
    by_name = {r.name: r for r in runs}
    f32, bf16 = by_name.get("capo_jax float32"), by_name.get("capo_jax bfloat16")
    if f32 and bf16:
        drift = max(abs(a - b) for a, b in zip(f32.losses, bf16.losses))
        moved = max(abs(x - f32.losses[0]) for x in f32.losses)
        ref = f" vs pytorch-capo_jax float32 {max(abs(a - b) for a, b in zip(base.losses, f32.losses)):.2e}" if base else ""
        print(f"  max |bf16 - f32| {drift:.2e} (f32 curve moves {moved:.2e}{ref})")

    if not args.no_probe:
        print("\nmatmul forward + backward probe, [4096, 768] x [2048, 768]^T, through the model's einsum:")
        for name, gflops in matmul_grad_probe(reps=3 if args.quick else 5):
            print(f"  {name:<24}{gflops:>8.0f} GFLOP/s")

    if not args.no_phases:
        steps = args.phase_steps or (2 if args.quick else 4)
        shares = phase_shares(steps, timeout=900)
        print(f"\nfull CAPO step phases, configs/demo.py, {steps} steps (first step excluded):")
        if isinstance(shares, str):
            print(f"  unavailable: {shares}")
        else:
            total = sum(shares.values()) or 1.0
            for k, v in sorted(shares.items(), key=lambda kv: -kv[1]):
                print(f"  {k:<20}{v:>8.2f}s{100 * v / total:>7.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
