"""Bootstrap the demo's tiny policy: build the tokenizer, train from scratch on noisy solutions, save an HF folder.

The supervised phase shows the model solutions with two kinds of flaw. Each step's result is off by a
little with a set probability (later steps carry the error on), so the model learns the arithmetic but
also learns to slip when sampled at the rollout temperature. And most solutions of the longest problems
box their answer one operation early, so the model also learns a habit that greedy decoding repeats: a
premature answer. RL with a verifier can unlearn both, and CAPO's step credit can point at the step
that went wrong. Finished bootstraps are cached by the hash of their settings in a user cache folder
shared by every workdir (`cached_bootstrap`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from capo_jax.data.arithmetic import DEFAULT_TEMPLATE, ArithmeticWorld, format_prompt, world_config
from capo_jax.data.templates import last_boxed
from capo_jax.data.tokenizer import save_tokenizer

# The tiny policy's shape (config `demo.model`).
MODEL_DEFAULTS: dict = {
    "model_type": "llama",  # llama | qwen2 (the architecture family written to config.json)
    "hidden_size": 128,  # model width
    "intermediate_size": 384,  # MLP width
    "num_layers": 3,  # decoder layers
    "num_heads": 4,  # attention heads (head_dim = hidden_size / num_heads)
    "num_kv_heads": 2,  # key/value heads (grouped-query attention)
    "max_position_embeddings": 256,  # longest prompt + response
    "rope_theta": 10000.0,  # rotary base
}

# The supervised bootstrap phase (config `demo.sft`).
SFT_DEFAULTS: dict = {
    "steps": 2000,  # optimizer steps
    "batch_size": 32,  # sequences per step
    "learning_rate": 5e-3,  # AdamW peak learning rate (warmup then cosine decay)
    "warmup_steps": 50,  # linear warmup steps
    "weight_decay": 0.01,  # AdamW weight decay
    "noise_prob": 0.25,  # probability that a solution step's result is off (later steps carry the error)
    "noise_max": 2,  # a noisy result is off by 1..noise_max
    "stop_short_prob": 0.6,  # probability that a long problem's solution boxes its answer one operation early
    "stop_short_ops": 4,  # the fewest operations of a problem whose solutions may stop short
    "num_eval": 64,  # held-out test problems for the accuracies printed at the end (greedy, and 2 samples each at T=1)
    "seed": 0,  # init, data and noise seed
}

BOOTSTRAP_VERSION = 3  # bump when the recipe changes, so old caches are retrained
_MARKER = "bootstrap.json"
_TRAIN_STREAM = 1 << 20  # the SFT problem stream (the RL data stream is data.seed)


def _merge(defaults: Mapping[str, Any], given: Any, what: str) -> dict:
    given = dict(given.to_dict() if hasattr(given, "to_dict") else (given or {}))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown demo.{what} settings {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A stable hash of the bootstrap settings (json with sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_config(m: Mapping[str, Any], tok: Any):
    from capo_jax.models import ModelConfig

    if m["hidden_size"] % m["num_heads"] or m["num_heads"] % m["num_kv_heads"]:
        raise ValueError("demo.model needs hidden_size divisible by num_heads, and num_heads by num_kv_heads")
    return ModelConfig(
        vocab_size=len(tok),
        hidden_size=int(m["hidden_size"]),
        intermediate_size=int(m["intermediate_size"]),
        num_layers=int(m["num_layers"]),
        num_heads=int(m["num_heads"]),
        num_kv_heads=int(m["num_kv_heads"]),
        head_dim=int(m["hidden_size"]) // int(m["num_heads"]),
        rope_theta=float(m["rope_theta"]),
        max_position_embeddings=int(m["max_position_embeddings"]),
        model_type=str(m["model_type"]),
        attention_bias=str(m["model_type"]) == "qwen2",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def sft_data(world: ArithmeticWorld, tok: Any, n: int, sft: Mapping[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy training sequences `<s> prompt solution </s>` as (ids[n, L], loss mask[n, L] on the solution + eos)."""
    rng = np.random.default_rng([seed, 7])
    prompts, completions = [], []
    for i in range(n):
        p = world.problem(i, "train", stream=_TRAIN_STREAM + seed)
        text, _ = p.noisy_solution(rng, float(sft["noise_prob"]), int(sft["noise_max"]),
                                    float(sft["stop_short_prob"]), int(sft["stop_short_ops"]))
        prompts.append(format_prompt(p.question, DEFAULT_TEMPLATE))
        completions.append(text)
    p_ids = tok(prompts)["input_ids"]
    c_ids = tok(completions, add_special_tokens=False)["input_ids"]
    length = max(len(a) + len(b) + 1 for a, b in zip(p_ids, c_ids))
    length = -(-length // 8) * 8
    ids = np.full((n, length), tok.pad_token_id, np.int32)
    mask = np.zeros((n, length), np.float32)
    for r, (a, b) in enumerate(zip(p_ids, c_ids)):
        seq = a + b + [tok.eos_token_id]
        ids[r, : len(seq)] = seq
        mask[r, len(a) : len(seq)] = 1.0
    return ids, mask


def _train(model, ids: np.ndarray, mask: np.ndarray, sft: Mapping[str, Any], log: Callable[[str], None]) -> list[float]:
    steps, bs = int(sft["steps"]), int(sft["batch_size"])
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, float(sft["learning_rate"]), max(1, int(sft["warmup_steps"])), max(steps, int(sft["warmup_steps"]) + 1)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=float(sft["weight_decay"])))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    def loss_fn(params, x, m):
        logits = nnx.merge(graphdef, params, rest)(x[:, :-1])  # right padding: pads never precede real tokens
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]
        w = m[:, 1:]
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(params, opt_state, x, m):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, m)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses, t0 = [], time.perf_counter()
    every = max(1, steps // 10)
    for s in range(steps):
        sl = slice(s * bs, (s + 1) * bs)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(ids[sl]), jnp.asarray(mask[sl]))
        losses.append(float(loss))
        if (s + 1) % every == 0 or s == 0:
            log(f"[bootstrap] step {s + 1}/{steps}  loss {np.mean(losses[-every:]):.4f}  {time.perf_counter() - t0:.1f}s")
    nnx.update(model, params)
    return losses


def bootstrap_settings(world: Any = None, model: Any = None, sft: Any = None, seed: int | None = None) -> dict:
    """The full, checked settings of a bootstrap (defaults filled in); their hash names the cached policy."""
    w = world_config(world.to_dict() if hasattr(world, "to_dict") else world)
    m = _merge(MODEL_DEFAULTS, model, "model")
    s = _merge(SFT_DEFAULTS, sft, "sft")
    if seed is not None:
        s["seed"] = int(seed)
    if m["model_type"] not in ("llama", "qwen2"):
        raise ValueError(f"demo.model.model_type must be llama or qwen2, got {m['model_type']!r}")
    return {"version": BOOTSTRAP_VERSION, "world": w, "model": m, "sft": s}


def cache_root(cache_dir: str = "") -> str:
    """The user cache folder: `cache_dir`, else $CAPO_JAX_CACHE, else $XDG_CACHE_HOME/capo_jax (~/.cache/capo_jax)."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get("CAPO_JAX_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["CAPO_JAX_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "capo_jax")


def _finished(out_dir: str, digest: str) -> bool:
    marker = os.path.join(out_dir, _MARKER)
    if not os.path.exists(marker) or not os.path.exists(os.path.join(out_dir, "config.json")):
        return False
    try:
        with open(marker) as f:
            return json.load(f).get("settings_hash") == digest
    except (OSError, ValueError):
        return False


def cached_bootstrap(cache_dir: str = "", *, world: Any = None, model: Any = None, sft: Any = None,
                     seed: int | None = None, log: Callable[[str], None] = print) -> str:
    """The demo policy for these settings from the user cache (`cache_root(cache_dir)/bootstrap/<hash>`), trained
    there first when missing. It is built in a private folder and renamed into place when done, so an interrupted or
    concurrent build never leaves a half-written policy under the hash."""
    digest = settings_hash(bootstrap_settings(world, model, sft, seed))
    final = os.path.join(cache_root(cache_dir), "bootstrap", digest)
    if _finished(final, digest):
        log(f"[bootstrap] reusing the cached bootstrap {final}")
        return final
    partial = f"{final}.partial-{builder_id()}"
    try:
        bootstrap_policy(partial, world=world, model=model, sft=sft, seed=seed, log=log)
        return finalize(partial, final, digest, log)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # a failed build's, or a loser's of the rename race


def builder_id() -> str:
    """`host-pid-random`: names this builder's private folder, unique also across hosts sharing a network cache."""
    host = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def finalize(partial: str, final: str, digest: str, log: Callable[[str], None] = print) -> str:
    """Move the finished build `partial` to `final` with one atomic rename and return `final`. When another builder
    got there first, its finished folder is kept and `partial` is left for the caller to remove; a broken leftover
    under `final` is first renamed aside (so no builder ever deletes a folder another may be renaming in)."""
    for _ in range(3):
        try:
            os.rename(partial, final)  # fails when `final` exists (a non-empty directory), so one builder wins
            log(f"[bootstrap] cached as {final}")
            return final
        except OSError:
            if _finished(final, digest):
                log(f"[bootstrap] another build of the same settings finished first: using {final}")
                return final
            if not os.path.exists(final):
                raise  # not a lost race: the rename itself failed
        aside = f"{final}.broken-{builder_id()}"
        try:
            os.rename(final, aside)  # a broken leftover under the hash: out of the way, then gone
        except FileNotFoundError:
            continue  # another builder moved it first
        if _finished(aside, digest):  # a winner's folder landed between the check and the move: put it back
            try:
                os.rename(aside, final)
                return final
            except OSError:
                pass
        shutil.rmtree(aside, ignore_errors=True)
    if _finished(final, digest):
        return final
    raise RuntimeError(f"could not move the bootstrap {partial} to {final}: other builds keep racing for it; "
                       f"delete {final} and run again")


def bootstrap_policy(
    out_dir: str,
    *,
    world: Any = None,
    model: Any = None,
    sft: Any = None,
    seed: int | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Build (or reuse) the demo policy in `out_dir` and return its path: an HF folder with the tokenizer.

    `world`, `model`, `sft` override `WORLD_DEFAULTS` / `MODEL_DEFAULTS` / `SFT_DEFAULTS`;
    `seed`, when given, overrides `sft.seed`.
    """
    from capo_jax.models import Transformer, save_pretrained

    settings = bootstrap_settings(world, model, sft, seed)
    w, m, s = settings["world"], settings["model"], settings["sft"]
    digest = settings_hash(settings)
    marker = os.path.join(out_dir, _MARKER)
    if _finished(out_dir, digest):
        log(f"[bootstrap] reusing the finished bootstrap in {out_dir} (settings {digest})")
        return out_dir
    if os.path.exists(marker):
        log(f"[bootstrap] {out_dir} holds a bootstrap with other settings: retraining")
        os.remove(marker)

    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    tok = save_tokenizer(out_dir)
    the_world = ArithmeticWorld(w)
    ids, mask = sft_data(the_world, tok, int(s["steps"]) * int(s["batch_size"]), s, int(s["seed"]))
    cfg = _model_config(m, tok)
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"SFT sequences need {ids.shape[1]} positions; raise demo.model.max_position_embeddings")
    policy = Transformer(cfg, rngs=nnx.Rngs(int(s["seed"])))
    log(f"[bootstrap] training a {cfg.num_layers}-layer, {cfg.hidden_size}-wide {cfg.model_type} policy "
        f"({sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))/1e6:.2f}M params) for {s['steps']} steps "
        f"on noisy solutions (step noise {s['noise_prob']}, long ones stopped short {s['stop_short_prob']}), "
        f"sequences of {ids.shape[1]} tokens")
    losses = _train(policy, ids, mask, s, log)
    train_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {"first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])), "train_seconds": train_s}
    if int(s["num_eval"]) > 0:
        from capo_jax.demo.heldout import evaluate_world

        ev = evaluate_world(policy, tok, the_world, num_problems=int(s["num_eval"]), samples=2, temperature=1.0,
                            max_new_tokens=ids.shape[1], seed=int(s["seed"]))
        metrics.update(ev)
        log(f"[bootstrap] held-out accuracy: greedy {ev['greedy_accuracy']:.3f} (step errors {ev['greedy_step_error_rate']:.3f}), "
            f"sampled at T=1 {ev['sampled_accuracy']:.3f} (step errors {ev['sampled_step_error_rate']:.3f}) "
            f"on {int(ev['problems'])} problems")
    save_pretrained(policy, out_dir)
    metrics["total_seconds"] = time.perf_counter() - t0
    with open(marker, "w") as f:
        json.dump({"settings_hash": digest, "settings": settings, "metrics": metrics}, f, indent=1)
    log(f"[bootstrap] saved {out_dir} in {metrics['total_seconds']:.1f}s")
    return out_dir
