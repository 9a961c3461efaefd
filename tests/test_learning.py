"""The trainer learns: GRPO on a toy reward raises the rollout reward far beyond what noise can.

A tiny random policy samples 4-token responses (the real sampler) and earns outcome 1 when its first
token lies in a target set that random sampling hits a quarter of the time; the real jitted PPO step
(group advantages, clipped loss, AdamW) then updates it. The same loop with the advantage's sign
flipped, the credit zeroed or the loss detached from the parameters must not clear the same bar, so
the test fails if any of those breaks creep into the trainer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capo_jax import parallel
from capo_jax.models import ModelConfig, Transformer
from capo_jax.rl import train_step as ts
from capo_jax.rl.train_step import PolicyTrainer, StepOptions, make_optimizer
from capo_jax.sampling import SamplingParams, generate

V, P, G, T, STEPS = 16, 4, 8, 4, 12
TARGET = np.arange(4, 8)  # 4 of 16 tokens: a random policy's first token hits it about 1/4 of the time
MARGIN = 0.35  # the reward of the last steps must beat the first steps' by this much


def _learn(seed: int = 0) -> list[float]:
    """Rollout reward per step of STEPS GRPO steps."""
    import ml_collections

    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, initializer_range=0.02)
    mesh = parallel.make_mesh(data=-1)
    model = parallel.shard_model(Transformer(cfg, rngs=nnx.Rngs(seed)), mesh, parallel.policy_rules())
    opts = StepOptions(group_size=G, micro_batch_size=P * G, logprob_chunk=T, reward_mode="grpo")
    optim = ml_collections.ConfigDict(dict(learning_rate=3e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                                           b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0))
    trainer = PolicyTrainer(model, opts, make_optimizer(optim, STEPS)[0], mesh)
    prompts = [[1, 8 + i] for i in range(P)]
    params = SamplingParams(n=G, temperature=1.0, max_new_tokens=T, ignore_eos=True)
    rewards = []
    for step in range(STEPS):
        key = jax.random.fold_in(jax.random.key(seed), step)
        res = generate(model, prompts, params, key, mesh)
        outcome = np.isin(res.tokens[:, 0], TARGET).astype(np.float32)
        rewards.append(float(outcome.mean()))
        B = P * G
        batch = {
            "prompt_ids": np.repeat(np.asarray(prompts, np.int32), G, axis=0), "prompt_mask": np.ones((B, 2), bool),
            "response_ids": res.tokens, "response_mask": np.ones((B, T), bool),
            "token_step": np.full((B, T), -1, np.int32), "outcome": outcome,
            "votes": np.zeros((B, 1, 1), bool), "vote_valid": np.zeros((B, 1), bool), "sampler_logp": res.logprobs,
        }
        trainer.step(batch, jax.random.fold_in(key, 1))
    return rewards


def _gain(rewards: list[float]) -> float:
    return float(np.mean(rewards[-3:]) - np.mean(rewards[:3]))


def test_grpo_raises_the_rollout_reward():
    rewards = _learn()
    assert _gain(rewards) > MARGIN, f"GRPO did not learn the toy reward: {np.round(rewards, 2)}"


def _flip(fn):
    def broken(batch, opts):
        out = dict(fn(batch, opts))
        out["advantages"] = -out["advantages"]
        return out
    return broken


def _zero(fn):
    def broken(batch, opts):
        out = dict(fn(batch, opts))
        out["advantages"] = jnp.zeros_like(out["advantages"])
        return out
    return broken


def _detach(fn):
    def broken(*args, **kwargs):
        logp, entropy = fn(*args, **kwargs)
        return jax.lax.stop_gradient(logp), entropy
    return broken


@pytest.mark.parametrize("name,attr,wrap", [("flipped advantage sign", "compute_advantages", _flip),
                                            ("zeroed credit", "compute_advantages", _zero),
                                            ("detached loss", "response_logprobs", _detach)])
def test_a_broken_trainer_does_not_clear_the_bar(monkeypatch, name, attr, wrap):
    monkeypatch.setattr(ts, attr, wrap(getattr(ts, attr)))
    rewards = _learn()
    assert _gain(rewards) < MARGIN / 2, f"{name}: the broken trainer still gained {_gain(rewards):.2f}: {np.round(rewards, 2)}"
