"""capo_jax's programs compiled ahead of time for real TPU slices (libtpu, no TPU), checked in their optimised HLO:
the rollout decode loop gathers no weights, the train step all-reduces no float32 activations and keeps its
temporary memory under a recorded budget, and the shipped config's 72B critic fits its slice.

Shapes are the real models' with fewer layers (widths are what decide layouts and collectives); figures that grow
with depth are taken from the full-depth shapes, which need no compilation."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from capo_jax.plan import topology  # noqa: E402

pytestmark = pytest.mark.skipif(not topology.libtpu_available(),
                                reason=f"libtpu is not installed: {topology.INSTALL_HINT}")

import optax  # noqa: E402
from flax import nnx  # noqa: E402

from capo_jax import parallel  # noqa: E402
from capo_jax.plan import hlo, programs, shapes  # noqa: E402

GiB = topology.GiB
SLICE = "v5e:2x4"
# The train step below (16 rows of 128 + 176 tokens, micro-batches of 8, 2 layers) compiled to 1.02 GiB of
# temporaries per device with libtpu 0.0.42.1 (2026-11-29); the budget catches growth beyond compiler noise. At
# this small size the unconstrained layout needs about as much (1.08 GiB): its defect shows in the all-reduces.
TRAIN_TEMP_BUDGET = 1.2 * GiB
PROMPT, RESPONSE = 128, 176  # sequence 304: no token axis of the train step equals a model dimension


def _policy(layers: int = 2, **kw):
    return shapes.model_config("Qwen/Qwen2.5-1.5B", dtype="bfloat16", param_dtype="float32", num_layers=layers,
                               remat=True, **kw)


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(data=1, fsdp=-1, tensor=1, devices=topology.devices(SLICE))


def test_slice_devices():
    assert len(topology.devices("v5e-8")) == 8
    v4 = topology.devices("v4-8")
    assert len(v4) == 8  # 4 chips, each core its own device: jax.make_mesh refuses them, make_mesh takes them in order
    assert dict(parallel.make_mesh(data=2, fsdp=-1, devices=v4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="libtpu refused"):
        topology.devices("v5e:3x3")


def _weight_gathers(analysis, cfg) -> list:
    smallest_weight = 2 * cfg.num_kv_heads * cfg.head_dim * cfg.hidden_size  # one layer's k kernel in bf16
    return [c for c in analysis.collectives if c.kind == "all-gather" and c.array_bytes >= smallest_weight]


def test_rollout_decode_gathers_no_weights_and_fits(mesh):
    """64 rows decoding from the inference copy of FSDP float32 master weights: no collective of weights per token,
    HBM bytes per token near the weights + KV cache it must read, and the copy and cache fit a v5e chip. Decoding
    from the master weights themselves (the control) gathers them every token."""
    from capo_jax.sampling import InferenceCopy, SamplingParams, lower_generate

    cfg = _policy()
    params = SamplingParams(n=16, max_new_tokens=64)
    steps = params.max_new_tokens - 1
    master = programs.abstract_model(cfg)
    nnx.update(master, programs.placed_state(master, mesh, parallel.policy_rules()))
    control = lower_generate(master, 4, 128, params, mesh)[1].compile()
    assert _weight_gathers(hlo.analyze(control.as_text(), default_trip=steps, num_devices=8), cfg)

    copy = InferenceCopy(programs.abstract_model(cfg), mesh)
    model = copy.abstract()
    _, decode, carry = lower_generate(model, 4, 128, params, mesh, rules=copy.rules)
    compiled = decode.compile()
    a = hlo.analyze(compiled.as_text(), default_trip=steps, num_devices=8)
    gathers = _weight_gathers(a, cfg)
    assert not gathers, [(c.array_bytes, c.op_name) for c in gathers]
    assert a.collective_bytes() / steps < 1e3  # per token: the loop's stop test only
    weights, cache = programs.device_bytes(nnx.state(model)), programs.device_bytes(carry.cache)
    assert 0.9 < a.hbm_bytes / steps / (weights + cache) < 1.3
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    full = programs.device_bytes(nnx.state(InferenceCopy(programs.abstract_model(_policy(28)), mesh).abstract()))
    assert total - weights + full < 0.9 * 16 * GiB  # with all 28 layers' weights the decode still fits


def _train_step(mesh):
    from capo_jax.rl.train_step import StepOptions, abstract_batch, build_train_program

    cfg = _policy()
    opts = StepOptions(group_size=16, micro_batch_size=8, logprob_chunk=RESPONSE // 2)
    program = build_train_program(programs.abstract_model(cfg), opts, optax.adamw(1e-6), mesh)
    return cfg, program.lower(abstract_batch(16, PROMPT, RESPONSE, 4, 8)).compile()


def _activation_all_reduces(compiled, cfg) -> list:
    """float32 all-reduces of arrays with a token axis (the sequence, the response or its chunk, or a micro-batch's
    tokens flattened; lengths chosen to equal no model dimension) at least one sequence's hidden states big."""
    a = hlo.analyze(compiled.as_text(), num_devices=8)
    lengths = (PROMPT + RESPONSE, RESPONSE, RESPONSE // 2)
    token_axes = set(lengths) | {8 * n for n in lengths}
    activation = (PROMPT + RESPONSE) * cfg.hidden_size * 4
    return [c for c in a.collectives if c.kind == "all-reduce" and c.dtype == "f32"
            and c.array_bytes >= activation and token_axes & set(c.dims)]


def test_train_step_all_reduces_no_activations_and_keeps_temp_in_budget(mesh):
    cfg, compiled = _train_step(mesh)
    reduces = _activation_all_reduces(compiled, cfg)
    assert not reduces, [(c.dims, c.op_name) for c in reduces]
    assert compiled.memory_analysis().temp_size_in_bytes < TRAIN_TEMP_BUDGET


@pytest.mark.slow
def test_train_step_without_activation_sharding_all_reduces_activations(mesh, monkeypatch):
    """The control for the test above: traced without the activation constraints, the same step all-reduces
    float32 activations (the layout the issue found)."""
    import contextlib

    monkeypatch.setattr(parallel, "activation_sharding", lambda mesh, rules: contextlib.nullcontext())
    cfg, compiled = _train_step(mesh)
    assert _activation_all_reduces(compiled, cfg)


def test_shipped_72b_critic_fits_its_slice():
    """The paper config's Qwen2.5-72B-Instruct critic on the config's own slice and mesh: the decode program at the
    config's batch and lengths (2 layers compiled; weights and cache counted at all 80) beside the policy's
    resident state; its decode loop's only collectives are all-reduces."""
    from capo_jax import config as config_lib
    from capo_jax.sampling import InferenceCopy

    config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "qwen2.5_1.5b.py"))
    roles = programs.build_roles(config, config.mesh.topology, layers=2, critic_layers=2)
    progs, res = programs.compile_critic(roles, log=lambda _: None, parts=("decode",))
    decode = next(p for p in progs if p.name == "critic decode")
    assert {c.kind for c in decode.analysis.collectives} == {"all-reduce"}
    full_critic = shapes.model_config(config.critic.model_id, dtype="bfloat16", param_dtype="bfloat16")
    rules = parallel.RULES[config.mesh.critic_rules]()
    full_copy = InferenceCopy(programs.abstract_model(full_critic), roles.critic_mesh, rules)
    weights = programs.device_bytes(nnx.state(full_copy.abstract()))
    cache = res.kv_cache * full_critic.num_layers / roles.critic.num_layers
    full_roles = programs.build_roles(config, config.mesh.topology)
    policy = programs.train_program(full_roles)[2].persistent if roles.critic_shared else 0
    m = decode.memory
    others = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes - res.params - res.kv_cache
    total = weights + cache + policy + others + m.temp_size_in_bytes
    assert total < 0.95 * roles.limits.hbm_bytes, total / GiB


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5_1.5b", "llama3.2_1b", "llama3.2_3b", "qwen2.5_1.5b_critic7b"])
def test_shipped_config_fits_the_slice_it_names(name):
    """Every phase of a paper config (train step, rollout, critic) fits its slice with 10% of HBM to spare, every
    program compiled at full depth (scanned layers: compile time hardly grows with depth)."""
    from capo_jax import config as config_lib
    from capo_jax.plan.planner import make_plan
    from capo_jax.plan.report import SPARE_TARGET

    config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
    plan = make_plan(config, config.mesh.topology, alternatives=0, log=lambda _: None)
    assert [ph.phase for ph in plan.phases] == ["train", "rollout", "critic"]
    for ph in plan.phases:
        assert ph.spare >= SPARE_TARGET, (ph.phase, ph.total / GiB, ph.parts)
