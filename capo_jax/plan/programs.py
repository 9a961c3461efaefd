"""capo_jax's real programs, built abstractly (shapes only, no weights) for a TPU slice and compiled ahead of time.

Nothing here re-implements a program: the train step is `rl.train_step.build_train_program` (what
`PolicyTrainer` runs), the rollout is `sampling.InferenceCopy` (the once-per-step reshard) and
`sampling.lower_generate` (the prefill and decode `generate` runs) with the loop's `rollout_params`, and the
critic is the same sampler on the critic's own mesh (`critic.genprm.critic_mesh`), rules and sampling params.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from capo_jax import config as config_lib
from capo_jax import parallel
from capo_jax.models import Transformer
from capo_jax.models.config import ModelConfig
from capo_jax.plan import analytic, hlo, shapes, topology


@dataclasses.dataclass
class Roles:
    """Where each role runs on the slice and the shapes it has."""

    config: ml_collections.ConfigDict
    slice: topology.Slice
    devices: list
    policy_mesh: Any
    critic_mesh: Any  # None when the run has no LLM critic
    policy: ModelConfig
    critic: ModelConfig | None
    critic_shared: bool  # the critic sits on the policy's devices

    @property
    def limits(self) -> topology.DeviceLimits:
        return topology.device_limits(self.slice, len(self.devices))


def build_roles(config: ml_collections.ConfigDict, slice_name: str, *, layers: int | None = None,
                critic_layers: int | None = None) -> Roles:
    """Devices, meshes and model shapes of a config on a named slice (`layers` shrinks the policy's depth,
    `critic_layers` the critic's: widths stay, so per-layer figures stay true)."""
    from capo_jax.critic.genprm import critic_mesh

    slice_ = topology.parse_slice(slice_name)
    devices = topology.devices(slice_)
    config_lib.validate(config, num_devices=len(devices), check_paths=False)
    policy_devices, critic_devices = config_lib.role_devices(config, devices)
    m = config.mesh
    policy_mesh = parallel.make_mesh(int(m.data), int(m.fsdp), int(m.tensor), devices=policy_devices)
    depth = {} if layers is None else {"num_layers": int(layers)}
    policy = shapes.model_config(shapes.role_source(config.policy.path, config.policy.model_id, "policy"),
                                 dtype=config.optim.compute_dtype, param_dtype=config.policy.param_dtype,
                                 remat=bool(config.policy.remat), **depth)
    critic = mesh_c = None
    if config_lib.uses_llm_critic(config):
        depth = {} if critic_layers is None else {"num_layers": int(critic_layers)}
        critic = shapes.model_config(shapes.role_source(config.critic.path, config.critic.model_id, "critic"),
                                     dtype=config.critic.dtype, param_dtype=config.critic.dtype, **depth)
        mesh_c = critic_mesh(config.critic, devices)
    return Roles(config=config, slice=slice_, devices=devices, policy_mesh=policy_mesh, critic_mesh=mesh_c,
                 policy=policy, critic=critic, critic_shared=critic_devices is None)


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    """The model with shapes and logical names and no memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs (or arrays) carrying shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * jax.numpy.dtype(x.dtype).itemsize
    return total


def placed_state(model: nnx.Module, mesh: Any, rules: Any) -> Any:
    """An abstract model's state as ShapeDtypeStructs carrying the shardings `rules` give on `mesh`."""
    state = nnx.state(model)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                        parallel.state_shardings(state, mesh, rules))


@dataclasses.dataclass(frozen=True)
class Memory:
    """`compiled.memory_analysis()`'s figures per device (field names as jax's)."""

    argument_size_in_bytes: float
    output_size_in_bytes: float
    alias_size_in_bytes: float
    temp_size_in_bytes: float

    @classmethod
    def of(cls, stats: Any) -> "Memory":
        return cls(float(stats.argument_size_in_bytes), float(stats.output_size_in_bytes),
                   float(stats.alias_size_in_bytes), float(stats.temp_size_in_bytes))


@dataclasses.dataclass
class Program:
    """One compiled program and what its HLO says, per device per call."""

    name: str
    role: str  # "policy" or "critic"
    phase: str  # "train", "rollout" or "critic": which memory phase it runs in
    seconds: float  # compile time on this host
    memory: Memory
    flops: float
    hbm_bytes: float
    collectives: dict[str, tuple[float, float]]  # kind -> (runs, bytes each device sends)
    undetermined_trips: list[float]  # loops whose trip count the HLO does not say (counted this many times)
    per: int  # calls are reported per this many steps (decode: tokens), else 1
    unit: str  # "step" / "token" / "call"
    analytic_flops: float  # per device per call
    analytic_bytes: float | None  # per device per call (decode: weights + KV read per token x tokens)
    holds_resident: bool  # its arguments already include the role's resident state (params, optimizer)
    analysis: hlo.Analysis | None = dataclasses.field(repr=False, default=None)
    text: str = dataclasses.field(repr=False, default="")

    @property
    def total_bytes(self) -> float:
        m = self.memory
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    @property
    def collective_bytes(self) -> float:
        return sum(sent for _, sent in self.collectives.values())


def _compile(name: str, role: str, phase: str, lowered: Any, *, default_trip: int | None, per: int, unit: str,
             analytic_flops: float, analytic_bytes: float | None, holds_resident: bool, num_devices: int,
             log: Callable[[str], None]) -> Program:
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    analysis = hlo.analyze(text, default_trip=default_trip, num_devices=num_devices)
    log(f"[plan] compiled {role} {name} in {seconds:.0f} s")
    return Program(name=name, role=role, phase=phase, seconds=seconds, memory=Memory.of(compiled.memory_analysis()),
                   flops=analysis.flops, hbm_bytes=analysis.hbm_bytes, collectives=analysis.by_kind(),
                   undetermined_trips=[t for _, t, derived in analysis.loops if not derived], per=per, unit=unit,
                   analytic_flops=analytic_flops, analytic_bytes=analytic_bytes, holds_resident=holds_resident,
                   analysis=analysis, text=text)


@dataclasses.dataclass
class Resident:
    """Bytes per device a role holds between programs."""

    params: int = 0
    optimizer: int = 0
    rollout_copy: int = 0  # live during the rollout only
    kv_cache: int = 0  # the decode loop's, live during generation only

    @property
    def persistent(self) -> int:
        return self.params + self.optimizer


def train_program(roles: Roles) -> tuple[Any, dict, Resident, tuple]:
    """The policy's train program (as `PolicyTrainer` builds it), the abstract batch of the config, the parameter /
    optimizer bytes per device its shardings give, and the program's abstract arguments (lower with these: they
    hold the abstract optimizer state, which costs a trace of the optimizer's init to make)."""
    from capo_jax.rl.train_step import StepOptions, abstract_batch, build_train_program, make_optimizer

    c = roles.config
    opts = StepOptions.from_config(c)
    optimizer, _ = make_optimizer(c.optim, int(c.total_steps) * opts.updates_per_step)
    policy = abstract_model(roles.policy)
    reference = None
    if opts.kl_coef > 0:
        reference = abstract_model(roles.policy.replace(dtype=c.reference.dtype, param_dtype=c.reference.dtype))
    program = build_train_program(policy, opts, optimizer, roles.policy_mesh, rules=parallel.RULES[c.mesh.policy_rules](),
                                  reference=reference, reference_rules=parallel.RULES[c.mesh.reference_rules]())
    rows = int(c.rollout.prompts_per_step) * int(c.rollout.group_size)
    batch = abstract_batch(rows, int(c.rollout.max_prompt_len), int(c.rollout.max_new_tokens),
                           int(c.critic.num_critiques), int(c.reward.max_steps))
    args = program.abstract_args(batch)
    params, opt_state, _, _, ref = args
    resident = Resident(params=device_bytes(params) + (device_bytes(ref) if ref is not None else 0),
                        optimizer=device_bytes(opt_state))
    return program, batch, resident, args


def compile_train(roles: Roles, log: Callable[[str], None] = print) -> tuple[Program, Resident]:
    """The policy's jitted CAPO update at the config's batch."""
    c = roles.config
    program, batch, resident, args = train_program(roles)
    opts = program.opts
    rows = batch["outcome"].shape[0]
    n = len(roles.policy_mesh.devices.flat)
    flops = analytic.train_step_flops(
        roles.policy, rows=rows, prompt_len=int(c.rollout.max_prompt_len), response_len=int(c.rollout.max_new_tokens),
        ppo_epochs=opts.ppo_epochs, remat=roles.policy.remat, logprob_remat=opts.logprob_remat,
        recompute_old=opts.old_logprob_source == "recompute", reference=opts.kl_coef > 0) / n
    prog = _compile("train step", "policy", "train", program.jitted(batch).lower(*args), default_trip=None, per=1,
                    unit="step", analytic_flops=flops, analytic_bytes=None, holds_resident=True, num_devices=n, log=log)
    return prog, resident


def _generation(roles: Roles, model_cfg: ModelConfig, mesh: Any, rules: Any, params: Any, prompts: int,
                prompt_len: int, role: str, phase: str, log: Callable[[str], None], source_state: Any = None,
                parts: tuple[str, ...] = ("reshard", "prefill", "decode")) -> tuple[list[Program], int, int]:
    """The `parts` of one role's generation (the reshard only when `source_state` is given), and its copy's and its
    cache's bytes per device."""
    from capo_jax.sampling import InferenceCopy, lower_generate

    copy = InferenceCopy(abstract_model(model_cfg), mesh, rules)
    model = copy.abstract()
    weights = device_bytes(nnx.state(model))
    # what one decode step must read: every weight but an untied embedding table (the lookup reads a few rows)
    read = weights - (0 if copy.config.tie_word_embeddings else device_bytes(nnx.state(model)["embed"]))
    prefill, decode, carry = lower_generate(model, prompts, prompt_len, params, mesh, rules=copy.rules)
    cache = device_bytes(carry.cache)
    n = len(mesh.devices.flat)
    rows = carry.tokens.shape[0]
    cache_len = carry.cache.max_len if hasattr(carry.cache, "max_len") else int(carry.cache.mask.shape[1])
    steps = max(int(params.max_new_tokens) - 1, 1)
    programs = []
    if source_state is not None and "reshard" in parts:
        reshard = copy._convert.lower(source_state)
        programs.append(_compile("rollout reshard", role, phase, reshard, default_trip=None, per=1, unit="step",
                                 analytic_flops=0.0, analytic_bytes=None, holds_resident=True, num_devices=n, log=log))
    batch = carry.tokens.shape[0] // params.n
    if "prefill" in parts:
        programs.append(_compile(
            f"{role if role == 'critic' else 'rollout'} prefill", role, phase, prefill, default_trip=None, per=1,
            unit="call", analytic_flops=analytic.prefill_flops(copy.config, prompts=batch, prompt_len=prompt_len) / n,
            analytic_bytes=None, holds_resident=False, num_devices=n, log=log))
    if "decode" in parts:
        flops = analytic.decode_token_flops(copy.config, rows=rows, cache_len=cache_len) * steps / n
        programs.append(_compile(
            f"{role if role == 'critic' else 'rollout'} decode", role, phase, decode, default_trip=steps, per=steps,
            unit="token", analytic_flops=flops, analytic_bytes=float(read + cache) * steps, holds_resident=False,
            num_devices=n, log=log))
    return programs, weights, cache


def compile_rollout(roles: Roles, log: Callable[[str], None] = print) -> tuple[list[Program], Resident]:
    """The policy's rollout as the loop runs it: the once-per-step reshard to the inference copy, then the prefill and
    decode of all P x G rows."""
    from capo_jax.rl.loop import rollout_params

    c = roles.config
    pad = roles.policy.pad_token_id if roles.policy.pad_token_id is not None else 0
    params = rollout_params(c, pad)
    source = placed_state(abstract_model(roles.policy), roles.policy_mesh, parallel.RULES[c.mesh.policy_rules]())
    programs, weights, cache = _generation(roles, roles.policy, roles.policy_mesh, parallel.RULES[c.mesh.rollout_rules](),
                                           params, int(c.rollout.prompts_per_step), int(c.rollout.max_prompt_len),
                                           "policy", "rollout", log, source_state=source)
    return programs, Resident(rollout_copy=weights, kv_cache=cache)


def critic_resident(roles: Roles) -> Resident:
    """The critic's weights per device as the runtime holds them (its inference copy), without compiling."""
    from capo_jax.sampling import InferenceCopy

    copy = InferenceCopy(abstract_model(roles.critic), roles.critic_mesh, parallel.RULES[roles.config.mesh.critic_rules]())
    return Resident(params=device_bytes(nnx.state(copy.abstract())))


def compile_critic(roles: Roles, log: Callable[[str], None] = print,
                   parts: tuple[str, ...] = ("prefill", "decode")) -> tuple[list[Program], Resident]:
    """The critic's prefill and decode of one `critic.batch_size` call (M samples per prompt, prompts of
    `critic.max_prompt_tokens`) on its own mesh, as `GenPRMCritic` runs them."""
    from capo_jax.critic.genprm import sampling_params

    c = roles.config
    params = sampling_params(int(c.critic.num_critiques), temperature=float(c.critic.temperature),
                             top_p=float(c.critic.top_p), max_new_tokens=int(c.critic.max_new_tokens))
    programs, weights, cache = _generation(roles, roles.critic, roles.critic_mesh, parallel.RULES[c.mesh.critic_rules](),
                                           params, int(c.critic.batch_size), int(c.critic.max_prompt_tokens),
                                           "critic", "critic", log, parts=parts)
    return programs, Resident(params=weights, kv_cache=cache)
