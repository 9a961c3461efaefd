"""PPO-clip policy loss with a KL estimator and micro-batch-exact aggregation (pure jax.numpy).

Every aggregation is written as sum_{b,t} weight[b,t] * loss[b,t] where the weights use
denominators taken over the whole mini-batch (`minibatch_denominators`), so summing the
per-micro-batch losses (and gradients) gives exactly the loss of the whole mini-batch.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

KL_LOG_RATIO_CLAMP = 20.0  # |log(pi_ref/pi)| is clamped here before exponentiating (k3), so one token cannot overflow
RATIO_LOG_CLAMP = 20.0  # |log(pi/pi_old)| is clamped here before exponentiating (verl's convention), so exp cannot overflow


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens (Schulman's k1/k2/k3)."""
    log_ratio = jnp.clip(ref_logp - logp, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # log(pi_ref / pi)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


def minibatch_denominators(mask: jax.Array) -> dict[str, jax.Array]:
    """Denominators of the aggregations over a whole mini-batch: valid tokens and sequences with any."""
    mask = mask.astype(jnp.float32)
    return {
        "num_tokens": jnp.maximum(mask.sum(), 1.0),
        "num_seqs": jnp.maximum((mask.sum(-1) > 0).sum().astype(jnp.float32), 1.0),
    }


def token_weights(mask: jax.Array, agg: str, denoms: Mapping[str, jax.Array]) -> jax.Array:
    """Weight of each token in the mini-batch loss, so that loss = sum(weight * per_token_loss)."""
    mask = mask.astype(jnp.float32)
    if agg == "token_mean":
        return mask / denoms["num_tokens"]
    if agg == "seq_mean_token_mean":
        lengths = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        return mask / (lengths * denoms["num_seqs"])
    if agg == "seq_mean_token_sum_norm":
        return mask / (mask.shape[-1] * denoms["num_seqs"])
    raise ValueError(f"unknown loss aggregation {agg!r}: use token_mean, seq_mean_token_mean or seq_mean_token_sum_norm")


def ppo_token_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 0.0,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO-clip loss (to minimise) plus beta * KL, and per-token diagnostics.

    The log-ratio is clamped to +-RATIO_LOG_CLAMP before exp (a far-off token gives a finite loss and
    gradient). `clip_ratio_c` > 1 turns on the dual clip: where A < 0 the loss is capped at -A * c; the
    diagnostics then include `clipped_dual`, the tokens it caps (counted apart from `clipped`, as verl does).
    """
    ratio = jnp.exp(jnp.clip(logp - old_logp, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(unclipped, clipped)
    parts = {"clipped": (clipped > unclipped).astype(jnp.float32)}
    if clip_ratio_c:
        capped = (advantages < 0) & (pg > -advantages * clip_ratio_c)
        parts["clipped_dual"] = capped.astype(jnp.float32)  # verl's pg_clipfrac_lower: tokens the dual clip caps
        pg = jnp.where(capped, -advantages * clip_ratio_c, pg)
    loss = pg
    parts.update(pg_loss=pg, ratio=ratio,
                 old_kl=kl_estimate(logp, old_logp, "k3"))  # how far this update has moved from the sampling policy
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        loss = loss + kl_coef * kl
        parts["kl"] = kl
    return loss, parts


def aggregate(per_token: jax.Array, weights: jax.Array) -> jax.Array:
    """The (micro-batch's share of the) mini-batch loss: sum of weighted per-token values.

    Positions of weight 0 are selected out, not multiplied by 0, so an inf or NaN there cannot reach the sum.
    """
    return jnp.sum(jnp.where(weights != 0, per_token, 0.0) * weights)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    denoms: Mapping[str, jax.Array],
    *,
    agg: str,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float = 0.0,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A micro-batch's contribution to the mini-batch loss, and its contribution to token-mean diagnostics.

    The inputs are zeroed at masked positions first, so whatever a padded position holds (inf, NaN)
    reaches neither the loss nor, through the chain rule, the gradient.
    """
    valid = mask != 0

    def keep(x: jax.Array) -> jax.Array:
        return jnp.where(valid, x, 0.0)

    per_token, parts = ppo_token_loss(
        keep(logp), keep(old_logp), keep(advantages), clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        ref_logp=None if ref_logp is None else keep(ref_logp), kl_coef=kl_coef, kl_estimator=kl_estimator,
    )
    loss = aggregate(per_token, token_weights(mask, agg, denoms))
    mean_w = token_weights(mask, "token_mean", denoms)
    stats = {k: aggregate(jax.lax.stop_gradient(v), mean_w) for k, v in parts.items()}
    return loss, stats
