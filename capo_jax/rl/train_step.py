"""The jitted, sharded CAPO update: credits -> old/ref log-probs -> ppo_epochs x mini-batches of PPO-clip.

One `jax.jit` call per RL step with explicit in/out shardings and donated policy state. Inside:
the pure credit function (`capo_jax.rewards.credit.compute_credits`) turns outcome/votes/steps
into per-token advantages; old log-probs come from a forward pass of the pre-update policy (or
the sampler); each mini-batch's loss is sum(weight * per-token loss) with its denominators taken
over the whole mini-batch first, so the micro-batch gradient accumulation (a `lax.scan`) gives
the same update as one big batch. Log-probs are computed in sequence chunks (`hidden_states`,
then `logits` per chunk under `lax.map` with remat) so `[B, T, vocab]` never exists whole; the vocab
projection is laid out (under FSDP: gathered) once per pass, not once per chunk. A non-finite loss or
gradient keeps the old parameters and optimizer state (counted in metrics).

The step is traced under `parallel.activation_sharding` with the policy's rules: activations keep their batch
over ('data', 'fsdp'), so the compiler gathers FSDP weights instead of resharding activations along `embed`.
`build_train_program` builds the jitted step and its shardings from a model's (possibly abstract) state: the
trainer runs it, and the planner compiles the same program for TPU slices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from capo_jax import parallel
from capo_jax import multihost
from capo_jax.multihost import replicated, spans_processes
from capo_jax.rl import losses

# Arrays of one rollout batch (B = prompts x G rows, group rows contiguous), all fixed-shape.
BATCH_KEYS = {
    "prompt_ids": np.int32,  # [B, P] left-padded prompt tokens
    "prompt_mask": np.bool_,  # [B, P] real prompt tokens
    "response_ids": np.int32,  # [B, T] sampled tokens, right-padded
    "response_mask": np.bool_,  # [B, T] valid response tokens (up to and including EOS)
    "token_step": np.int32,  # [B, T] step of each token, -1 = none
    "outcome": np.float32,  # [B] verifier (or critic-judged) outcome in {0, 1}
    "votes": np.bool_,  # [B, M, S] critique j flags step s of row b
    "vote_valid": np.bool_,  # [B, M] critique j of row b parsed
    "sampler_logp": np.float32,  # [B, T] log-probs the sampler reported (old_logprob_source="sampler")
}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static hyperparameters of the jitted step (hashable; a change recompiles)."""

    group_size: int
    ppo_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "token_mean"
    old_logprob_source: str = "recompute"
    logprob_chunk: int = 128
    logprob_remat: bool = True
    reward_mode: str = "capo"
    vote: str = "intersection"
    w_whole: float = 2.0
    w_process: float = 1.0
    norm: str = "group_token"
    eps: float = 1e-6

    @classmethod
    def from_config(cls, config: Any) -> "StepOptions":
        """Read the step's knobs from the full ml_collections config."""
        rl, rw = config.rl, config.reward
        return cls(
            group_size=int(config.rollout.group_size), ppo_epochs=int(rl.ppo_epochs), num_minibatches=int(rl.num_minibatches),
            micro_batch_size=int(rl.micro_batch_size), clip_low=float(rl.clip_low), clip_high=float(rl.clip_high),
            clip_ratio_c=float(rl.clip_ratio_c), kl_coef=float(rl.kl_coef), kl_estimator=str(rl.kl_estimator), loss_agg=str(rl.loss_agg),
            old_logprob_source=str(rl.old_logprob_source), logprob_chunk=int(rl.logprob_chunk), logprob_remat=bool(rl.logprob_remat),
            reward_mode=str(rw.mode), vote=str(config.critic.vote), w_whole=float(rw.w_whole),
            w_process=float(rw.w_process), norm=str(rw.norm), eps=float(rw.eps),
        )

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step."""
        return self.ppo_epochs * self.num_minibatches


def learning_rate_schedule(optim: Any, total_updates: int) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to peak * min_lr_ratio at the last update."""
    peak = float(optim.learning_rate)
    warmup = int(min(optim.warmup_steps, max(total_updates - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(int(total_updates), warmup + 1), end_value=peak * float(optim.min_lr_ratio),
    )


def make_optimizer(optim: Any, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the warm-up + cosine schedule behind global-norm clipping (0 = no clipping)."""
    schedule = learning_rate_schedule(optim, total_updates)
    parts = []
    if float(optim.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=float(optim.weight_decay)))
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------
# Chunked log-probs


def response_logprobs(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    response_ids: jax.Array,
    response_mask: jax.Array,
    chunk: int,
    remat: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """log pi(response token | prefix) and the policy's entropy at each response position, float32[B, T].

    One forward pass to the final hidden states, then logits and log-softmax per chunk of `chunk`
    positions under `lax.map`. With `remat` each chunk's logits are recomputed in the backward pass, so only a
    [B, chunk, V] block is ever live; without it the backward keeps every chunk's (one head matmul fewer).

    Under `parallel.activation_sharding` the vocab projection is vocab-parallel: the head is laid out once, its
    vocabulary split over every mesh axis (`head_vocab`), and each chunk's rows are gathered so each device
    computes all rows against its slice of the vocabulary. The head's gradient is then local to each device
    (summed over chunks in float32, laid back out once per pass), and only [rows, chunk] statistics and the
    chunk's hidden states cross devices.
    """
    b, p = prompt_ids.shape
    t = response_ids.shape[1]
    chunk = min(int(chunk), t)
    if t % chunk:
        raise ValueError(f"response length {t} is not divisible by logprob_chunk={chunk}")
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), response_mask.astype(bool)], axis=1)
    hidden = model.hidden_states(ids, mask)
    # Split over devices, the head is laid out once for all chunks, seen as float32 by them so that the backward sums
    # the chunks' head gradients in float32 (the round trip to the compute dtype is exact and folds away). On one
    # device each chunk casts the parameter itself (the same values, and no extra [V, E] buffer).
    sharded = parallel.active_axis_size("head_vocab") > 1
    head = model.head_weight(("head_vocab", None)).astype(jnp.float32) if sharded else None
    # position P-1+j predicts response token j
    h = jax.lax.dynamic_slice_in_dim(hidden, p - 1, t, axis=1)
    n = t // chunk
    h = h.reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)
    y = response_ids.reshape(b, n, chunk).swapaxes(0, 1)

    def one(args):
        h_c, y_c = args
        y_c = y_c.astype(jnp.int32)
        if sharded:
            h_c = parallel.relayout(h_c, (None, "length", None), ("batch", "length", None))
            # pinned here too, so each chunk's head gradient stays on the device that holds its vocabulary slice
            logits = model.logits(h_c, parallel.constrain(head, ("head_vocab", None)),
                                  names=(None, "length", "head_vocab"))
            # a select-and-sum over the split vocabulary, not a gather across its shards
            picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == y_c[..., None], logits, 0.0), axis=-1)
        else:
            logits = model.logits(h_c, head)
            picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        lse = jax.nn.logsumexp(logits, axis=-1)
        probs = jax.nn.softmax(logits, axis=-1)
        entropy = lse - jnp.sum(probs * logits, axis=-1)
        rows = ("batch", "length")
        return parallel.constrain(picked - lse, rows), parallel.constrain(entropy, rows)

    logp, entropy = jax.lax.map(jax.checkpoint(one) if remat else one, (h, y))
    return logp.swapaxes(0, 1).reshape(b, t), entropy.swapaxes(0, 1).reshape(b, t)


# ---------------------------------------------------------------------------------------------
# The step


def _split_rows(tree: Any, parts: int) -> Any:
    """[N, ...] -> [parts, N / parts, ...], part i taking rows i, i + parts, ... (strided).

    Strided, so each device's contiguous block of rows stays on that device in every part: no
    data moves between devices when the batch is cut into micro-batches.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1), tree)


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _masked_stats(x: jax.Array, mask: jax.Array, prefix: str) -> dict[str, jax.Array]:
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = jnp.sum(x * m) / n
    std = jnp.sqrt(jnp.sum(jnp.square(x - mean) * m) / n)
    big = jnp.finfo(jnp.float32).max
    return {f"{prefix}/mean": mean, f"{prefix}/std": std,
            f"{prefix}/min": jnp.min(jnp.where(m > 0, x, big)), f"{prefix}/max": jnp.max(jnp.where(m > 0, x, -big))}


def build_train_step(graphdef: Any, param_template: Any, optimizer: optax.GradientTransformation, opts: StepOptions,
                     mesh: Mesh, ref_graphdef: Any = None, ref_template: Any = None,
                     rules: parallel.Rules | None = None):
    """The pure step `(params, opt_state, batch, rng, ref_params) -> (params, opt_state, metrics)` (not yet jitted),
    traced under the activation sharding of `rules` (default: the policy rules) on `mesh`."""
    rules = parallel.policy_rules() if rules is None else rules
    # gradients are summed in the parameters' own layout (reduce-scattered into it under FSDP, not all-reduced)
    grad_shardings = _pure(parallel.state_shardings(param_template, mesh, rules))
    micro_spec = lambda ndim, size: PartitionSpec(None, *parallel.batch_spec(ndim - 1, mesh, size))  # noqa: E731

    def merge(gd, template, params):
        state = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(gd, state)

    def constrain_micro(tree, size):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, micro_spec(x.ndim, size))), tree)

    def forward_logp(gd, template, params, batch):
        """Log-probs of the whole batch without gradients, micro-batch by micro-batch."""
        k = batch["prompt_ids"].shape[0] // opts.micro_batch_size
        parts = constrain_micro(_split_rows({key: batch[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}, k),
                                opts.micro_batch_size)
        model = merge(gd, template, params)

        def one(mb):
            logp, _ = response_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"],
                                        opts.logprob_chunk)
            return logp

        logp = jax.lax.map(one, parts)  # [parts, rows / parts, T], part i holding rows i, i + parts, ...
        return jax.lax.stop_gradient(logp.swapaxes(0, 1).reshape(-1, logp.shape[-1]))

    def loss_fn(params, mb, denoms):
        model = merge(graphdef, param_template, params)
        logp, entropy = response_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"],
                                          opts.logprob_chunk, opts.logprob_remat)
        mask = mb["response_mask"].astype(jnp.float32)
        loss, stats = losses.policy_loss(
            logp, mb["old_logp"], mb["advantages"], mask, denoms, agg=opts.loss_agg, clip_low=opts.clip_low,
            clip_high=opts.clip_high, clip_ratio_c=opts.clip_ratio_c, ref_logp=mb.get("ref_logp"), kl_coef=opts.kl_coef, kl_estimator=opts.kl_estimator,
        )
        stats["entropy"] = losses.aggregate(jax.lax.stop_gradient(entropy), losses.token_weights(mask, "token_mean", denoms))
        return loss, stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_update(carry, mb):
        params, opt_state = carry
        denoms = losses.minibatch_denominators(mb["response_mask"])  # over the whole mini-batch, before the micro loop
        k = mb["prompt_ids"].shape[0] // opts.micro_batch_size
        micro = constrain_micro(_split_rows(mb, k), opts.micro_batch_size)
        zero_grads = jax.tree.map(jnp.zeros_like, params)

        def micro_step(acc, one):
            grads_acc, loss_acc, stats_acc = acc
            (loss, stats), grads = grad_fn(params, one, denoms)
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            stats_acc = jax.tree.map(jnp.add, stats_acc, stats)
            return (grads_acc, loss_acc + loss, stats_acc), None

        stats0 = {name: jnp.zeros((), jnp.float32) for name in ("pg_loss", "ratio", "clipped", "old_kl", "entropy")}
        if opts.kl_coef > 0:
            stats0["kl"] = jnp.zeros((), jnp.float32)
        if opts.clip_ratio_c:
            stats0["clipped_dual"] = jnp.zeros((), jnp.float32)
        (grads, loss, stats), _ = jax.lax.scan(micro_step, (zero_grads, jnp.zeros((), jnp.float32), stats0), micro)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        new_params = optax.apply_updates(params, updates)
        params = _select(ok, new_params, params)
        opt_state = _select(ok, new_opt_state, opt_state)
        out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/skipped_updates": 1.0 - ok.astype(jnp.float32),
               "train/pg_loss": stats["pg_loss"], "train/ratio": stats["ratio"], "train/clip_frac": stats["clipped"],
               "train/entropy": stats["entropy"], "train/approx_kl_old": stats["old_kl"]}
        if "kl" in stats:
            out["train/kl"] = stats["kl"]
        if "clipped_dual" in stats:
            out["train/clip_frac_dual"] = stats["clipped_dual"]
        return (params, opt_state), out

    def step(params, opt_state, batch, rng, ref_params):
        with parallel.activation_sharding(mesh, rules):
            return step_body(params, opt_state, batch, rng, ref_params)

    def step_body(params, opt_state, batch, rng, ref_params):
        mask = batch["response_mask"]
        credits = compute_advantages(batch, opts)
        data = {key: batch[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}
        data["advantages"] = credits["advantages"]
        if opts.old_logprob_source == "sampler":
            data["old_logp"] = batch["sampler_logp"]
        else:
            data["old_logp"] = forward_logp(graphdef, param_template, params, batch)
        if opts.kl_coef > 0:
            data["ref_logp"] = forward_logp(ref_graphdef, ref_template, ref_params, batch)
        n = mask.shape[0]

        def epoch(carry, key):
            order = jax.random.permutation(key, n) if opts.updates_per_step > 1 else jnp.arange(n)
            shuffled = jax.tree.map(lambda x: jnp.take(x, order, axis=0), data)
            return jax.lax.scan(minibatch_update, carry, _split_rows(shuffled, opts.num_minibatches))

        (params, opt_state), per_update = jax.lax.scan(epoch, (params, opt_state), jax.random.split(rng, opts.ppo_epochs))
        metrics = {k: jnp.mean(v) for k, v in per_update.items()}
        metrics["train/skipped_updates"] = jnp.sum(per_update["train/skipped_updates"])
        metrics.update(credit_metrics(credits, batch))
        if opts.old_logprob_source == "recompute":
            # how far the sampler's log-probs are from the recomputed ones (sampler/trainer mismatch)
            gap = jnp.abs(batch["sampler_logp"] - data["old_logp"])
            metrics["train/sampler_logp_gap"] = jnp.sum(gap * mask) / jnp.maximum(mask.sum(), 1)
        return params, opt_state, metrics

    return step


def compute_advantages(batch: Mapping[str, jax.Array], opts: StepOptions) -> dict[str, jax.Array]:
    """The pure credit function on the batch (inside jit): per-token rewards and advantages."""
    from capo_jax.rewards.credit import compute_credits

    return compute_credits(
        batch["outcome"], batch["votes"], batch["vote_valid"], batch["token_step"], batch["response_mask"],
        group_size=opts.group_size, vote=opts.vote, w_whole=opts.w_whole, w_process=opts.w_process,
        norm=opts.norm, eps=opts.eps, mode=opts.reward_mode,
    )


def credit_metrics(credits: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Reward, penalty and advantage diagnostics of one rollout batch."""
    mask = batch["response_mask"]
    out = {
        "reward/mean": jnp.mean(credits["seq_reward"]),
        "reward/frac_tokens_penalized": credits["penalized_token_frac"],
        "critic/no_valid_critique_frac": jnp.mean(credits["no_valid_critique"].astype(jnp.float32)),
        "critic/valid_critiques": jnp.mean(credits["num_valid_critiques"].astype(jnp.float32)),
    }
    out.update(_masked_stats(credits["advantages"], mask, "advantage"))
    out.update(_masked_stats(credits["rewards"], mask, "token_reward"))
    return out


# ---------------------------------------------------------------------------------------------
# The program (built from state that may be abstract) and the stateful wrapper the loop uses


def _pure(state: Any) -> Any:
    return nnx.to_pure_dict(state)


def _template(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def abstract_batch(rows: int, prompt_len: int, response_len: int, num_critiques: int, max_steps: int
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one rollout batch (`BATCH_KEYS`) without data: B = rows, P, T, M, S."""
    shapes = {"prompt_ids": (rows, prompt_len), "prompt_mask": (rows, prompt_len), "response_ids": (rows, response_len),
              "response_mask": (rows, response_len), "token_step": (rows, response_len), "outcome": (rows,),
              "votes": (rows, num_critiques, max_steps), "vote_valid": (rows, num_critiques),
              "sampler_logp": (rows, response_len)}
    return {k: jax.ShapeDtypeStruct(shapes[k], BATCH_KEYS[k]) for k in BATCH_KEYS}


@dataclasses.dataclass
class TrainProgram:
    """The step function and the shardings of everything it takes, built from a policy's (possibly abstract)
    state: `PolicyTrainer` runs `jitted(batch)`, the planner lowers the same function for a TPU slice."""

    mesh: Mesh
    opts: StepOptions
    optimizer: optax.GradientTransformation
    graphdef: Any
    template: Any  # nnx.State of ShapeDtypeStructs: the policy's parameters
    param_shardings: Any  # pure dict of NamedSharding
    opt_shardings: Any
    ref_template: Any
    ref_shardings: Any
    step_fn: Any

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        """Row (batch) dimension over the data-parallel axes, the rest replicated."""
        return {k: parallel.batch_sharding(v, self.mesh) for k, v in batch.items()}

    def jitted(self, batch: Mapping[str, Any]):
        """The step under `jax.jit` with explicit in/out shardings for batches shaped like `batch`; donates the
        parameters and optimizer state."""
        return jax.jit(
            self.step_fn,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_shardings(batch), self.replicated,
                          self.ref_shardings),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
            donate_argnums=(0, 1),
        )

    def abstract_args(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> tuple:
        """(params, opt_state, batch, key, ref_params) as ShapeDtypeStructs carrying their shardings."""
        def place(tree, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        params = place(_pure(self.template), self.param_shardings)
        opt_state = place(jax.eval_shape(self.optimizer.init, params), self.opt_shardings)
        placed = place(dict(batch), self.batch_shardings(batch))
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
        ref = None if self.ref_template is None else place(_pure(self.ref_template), self.ref_shardings)
        return params, opt_state, placed, key, ref

    def lower(self, batch: Mapping[str, jax.ShapeDtypeStruct]):
        """The jitted step lowered for abstract parameters, optimizer state, `batch` and key (nothing allocated)."""
        return self.jitted(batch).lower(*self.abstract_args(batch))


def build_train_program(model: nnx.Module, opts: StepOptions, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                        rules: parallel.Rules | None = None, reference: nnx.Module | None = None,
                        reference_rules: parallel.Rules | None = None) -> TrainProgram:
    """The train step for `model` (and the frozen `reference` when `opts.kl_coef > 0`) on `mesh`; either model may be
    abstract (`nnx.eval_shape`)."""
    if opts.kl_coef > 0 and reference is None:
        raise ValueError("rl.kl_coef > 0 needs a reference model: pass reference=... (or set rl.kl_coef=0)")
    rules = parallel.policy_rules() if rules is None else rules
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the policy has non-parameter state; the trainer only knows how to carry nnx.Param")
    template = _template(state)
    param_shardings = _pure(parallel.state_shardings(state, mesh, rules))
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _pure(state))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    ref_gd = ref_template = ref_shardings = None
    if opts.kl_coef > 0:
        ref_gd, ref_state, _ = nnx.split(reference, nnx.Param, ...)
        ref_template = _template(ref_state)
        ref_shardings = _pure(parallel.state_shardings(ref_state, mesh, reference_rules or parallel.inference_rules()))
    step_fn = build_train_step(graphdef, template, optimizer, opts, mesh, ref_gd, ref_template, rules)
    return TrainProgram(mesh=mesh, opts=opts, optimizer=optimizer, graphdef=graphdef, template=template,
                        param_shardings=param_shardings, opt_shardings=opt_shardings, ref_template=ref_template,
                        ref_shardings=ref_shardings, step_fn=step_fn)


class PolicyTrainer:
    """The policy's optimizer state and jitted step; keeps the live NNX model pointing at the newest weights.

    `model` must already be sharded on `mesh` (policy rules). `reference` (an NNX model, optional) is
    the frozen KL reference, needed only when `opts.kl_coef > 0`.
    """

    def __init__(self, model: nnx.Module, opts: StepOptions, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                 rules: parallel.Rules | None = None, reference: nnx.Module | None = None,
                 reference_rules: parallel.Rules | None = None) -> None:
        self.program = build_train_program(model, opts, optimizer, mesh, rules=rules, reference=reference,
                                           reference_rules=reference_rules)
        program = self.program
        self.model, self.opts, self.optimizer, self.mesh = model, opts, optimizer, mesh
        self.graphdef = program.graphdef
        _, self._state, _ = nnx.split(model, nnx.Param, ...)
        self.param_shardings, self.opt_shardings = program.param_shardings, program.opt_shardings
        self.replicated = program.replicated
        self.params = jax.device_put(_pure(self._state), self.param_shardings)
        self.opt_state = jax.jit(optimizer.init, out_shardings=self.opt_shardings)(self.params)
        self.ref_params = None
        if opts.kl_coef > 0:
            _, ref_state, _ = nnx.split(reference, nnx.Param, ...)
            self.ref_params = jax.device_put(_pure(ref_state), program.ref_shardings)
        self._jitted: dict[Any, Any] = {}
        self.sync_model()

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
        """Row (batch) dimension over the data-parallel axes, the rest replicated."""
        return self.program.batch_shardings(batch)

    def _compiled(self, batch: Mapping[str, Any]):
        key = tuple(sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype) if not hasattr(v, "dtype") else str(v.dtype))
                           for k, v in batch.items()))
        if key not in self._jitted:
            self._jitted[key] = self.program.jitted(batch)
        return self._jitted[key]

    def prepare_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Check keys and dtypes and place the host arrays on the mesh."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"rollout batch lacks {missing}; the train step needs {list(BATCH_KEYS)}")
        host = {k: np.asarray(batch[k], dtype=BATCH_KEYS[k]) for k in BATCH_KEYS}
        # each process passes its own rows (several processes: those of its row shards); one process: the whole batch
        factor = 1
        if spans_processes(self.mesh):
            shards = multihost.shards(self.mesh)
            factor = shards.count // len(shards.mine)
        shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * factor, *v.shape[1:]), v.dtype) for k, v in host.items()}
        shardings = self.batch_shardings(shapes)
        return {k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k].shape) for k, v in host.items()}

    def step(self, batch: Mapping[str, Any], rng: jax.Array) -> dict[str, jax.Array]:
        """One RL update on a rollout batch; returns the step's metrics (device scalars)."""
        placed = self.prepare_batch(batch)
        fn = self._compiled(placed)
        rng = replicated(self.mesh, rng) if spans_processes(self.mesh) else jax.device_put(rng, self.replicated)
        self.params, self.opt_state, metrics = fn(self.params, self.opt_state, placed, rng, self.ref_params)
        self.sync_model()
        return metrics

    def sync_model(self) -> None:
        """Point the live NNX model (used by the sampler) at the current parameters, without a copy."""
        nnx.replace_by_pure_dict(self._state, self.params)
        nnx.update(self.model, self._state)

    def set_state(self, params: Any, opt_state: Any) -> None:
        """Adopt restored parameters and optimizer state (already on the right shardings)."""
        self.params, self.opt_state = params, opt_state
        self.sync_model()
