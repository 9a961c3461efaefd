"""Meshes, logical-axis rules, sharded models and batches on the 8 simulated CPU devices."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from capo_jax import parallel
from capo_jax.models import create_model, forward, from_pretrained, init_cache, ModelConfig
from tiny_hf import make_tiny_checkpoint

IDS = np.random.RandomState(0).randint(0, 260, (4, 10)).astype(np.int32)


def test_make_mesh_fills_and_uses_auto_axes():
    mesh = parallel.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(parallel.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(parallel.mesh_from_config({"fsdp": 2, "tensor": 4}).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(ValueError, match="needs 12 devices"):
        parallel.make_mesh(data=3, fsdp=4)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="cannot be split"):
        parallel.make_mesh(data=-1, tensor=3)


def test_make_mesh_takes_cores_in_order_and_lets_other_errors_through(monkeypatch):
    """Devices that share a chip (libtpu's v4 / v5p cores) go into the mesh in their given order without asking jax;
    any other failure of `jax.make_mesh` (here a forced AssertionError) reaches the caller instead of a fallback."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Core:  # what libtpu's ahead-of-time v4 devices carry that make_mesh looks at
        id: int
        process_index: int
        coords: tuple
        core_on_chip: int
        platform: str = "tpu"

    cores = [Core(i, 0, (i // 2, 0, 0), i % 2) for i in range(8)]
    asked = []
    real = jax.make_mesh
    monkeypatch.setattr(jax, "make_mesh", lambda *a, **k: asked.append(a) or real(*a, **k))
    mesh = parallel.make_mesh(data=2, fsdp=-1, devices=cores)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1} and not asked
    assert [d.id for d in mesh.devices.flat] == list(range(8))
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4, "tensor": 1} and len(asked) == 1

    def broken(*a, **k):
        raise AssertionError("a bug in mesh construction")

    monkeypatch.setattr(jax, "make_mesh", broken)
    with pytest.raises(AssertionError, match="a bug in mesh construction"):
        parallel.make_mesh(data=2, fsdp=-1)


def test_logical_to_spec_rules_and_divisibility_fallback():
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    rules = parallel.policy_rules()
    assert parallel.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules, mesh, (2, 64, 8, 16)) == \
        P(None, "fsdp", "tensor", None)
    # 2 kv heads cannot split 4 ways: replicated, not an error
    spec = parallel.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, mesh, (64, 2, 16))
    assert spec == P("fsdp", None, None)
    # an odd embed size falls back too
    assert parallel.logical_to_spec(("vocab", "embed"), rules, mesh, (272, 63)) == P("tensor", None)
    # batch over ('data', 'fsdp'): size-1 'data' is dropped; a tuple shrinks from the right when it must
    mesh2 = parallel.make_mesh(data=2, fsdp=4, tensor=1)
    assert parallel.logical_to_spec(("batch", "length"), rules, mesh2, (16, 5)) == P(("data", "fsdp"), None)
    assert parallel.logical_to_spec(("batch", "length"), rules, mesh2, (6, 5)) == P("data", None)
    # the same mesh axis is never used twice in one spec
    assert parallel.logical_to_spec(("mlp", "heads"), rules, mesh, (8, 8)) == P("tensor", None)
    # inference rules: no fsdp on weights
    assert parallel.logical_to_spec(("embed", "mlp"), parallel.inference_rules(), mesh, (64, 96)) == P(None, "tensor")
    # without a mesh: the plain rule table
    assert parallel.logical_to_spec(("embed", "unknown"), rules) == P("fsdp", None)
    assert parallel.logical_to_spec(None, rules) == P()


def _jit_forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, IDS)


def test_sharded_forward_equals_unsharded():
    cfg = ModelConfig(vocab_size=272, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
                      head_dim=16, num_layers=2)
    model = create_model(cfg, seed=1)
    ref = np.asarray(forward(model, IDS))
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    parallel.shard_model(model, mesh, parallel.policy_rules())
    q = model.layers.attn.q.get_value()
    assert q.sharding.spec == P(None, "tensor", None, "fsdp")
    assert q.addressable_shards[0].data.shape == (2, 1, 16, 32)
    out = _jit_forward(model)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    with parallel.activation_sharding(mesh, parallel.policy_rules()):  # pinned activations: same values
        pinned = _jit_forward(model)
    np.testing.assert_allclose(np.asarray(pinned), ref, atol=1e-5)
    assert pinned.sharding.spec == P("fsdp", None, "tensor")
    # a sharded KV cache + sharded batch through the cached path
    cache = init_cache(cfg, 4, 12)
    cache = jax.device_put(cache, parallel.cache_shardings(cache, mesh, parallel.policy_rules()))
    assert cache.k.sharding.spec == P(None, "fsdp", None, None, None)
    per_layer = parallel.cache_shardings(init_cache(cfg, 4, 12, per_layer=True), mesh, parallel.policy_rules())
    assert len(per_layer.k) == cfg.num_layers and all(s.spec == P("fsdp", None, None, None) for s in per_layer.v)
    ids = parallel.shard_batch(IDS, mesh)
    assert ids.sharding.spec == P("fsdp", None)
    logits, cache = forward(model, ids, cache=cache)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5)


def test_create_model_places_parameters_on_the_mesh():
    mesh = parallel.make_mesh(data=2, fsdp=1, tensor=4)
    model = create_model(ModelConfig(vocab_size=128, intermediate_size=96), mesh=mesh, rules=parallel.inference_rules())
    assert model.embed.get_value().sharding.spec == P("tensor", None)
    assert model.layers.mlp.down.get_value().sharding.spec == P(None, None, "tensor")
    assert set(model.layers.mlp.down.get_value().sharding.mesh.axis_names) == {"data", "fsdp", "tensor"}


def test_from_pretrained_places_each_param_on_its_target_sharding(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "qwen2", num_key_value_heads=2, tokenizer=False)
    ref = np.asarray(forward(from_pretrained(folder), IDS))
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    rules = parallel.policy_rules()
    model = from_pretrained(folder, mesh=mesh, rules=rules)
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = var.get_value()
        target = parallel.logical_to_sharding(parallel.variable_names(var), mesh, rules, arr.shape)
        assert isinstance(arr.sharding, NamedSharding) and arr.sharding.is_equivalent_to(target, arr.ndim), path
        sharded += arr.sharding.spec != P(*([None] * arr.ndim)) and any(arr.sharding.spec)
    assert sharded >= 8
    np.testing.assert_allclose(np.asarray(_jit_forward(model)), ref, atol=1e-5)


def test_batch_sharding_helpers():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    batch = {"ids": np.zeros((8, 5), np.int32), "mask": np.ones((8, 5), bool), "step": np.int32(3)}
    out = parallel.shard_batch(batch, mesh)
    assert out["ids"].sharding.spec == P(("data", "fsdp"), None)
    assert out["step"].sharding.spec == P()
    assert parallel.batch_sharding(jnp.zeros((6, 3)), mesh).spec == P("data", None)


def test_sharded_model_exports_the_same_weights(tmp_path):
    from capo_jax.models import save_pretrained
    from capo_jax.models.safetensors_io import SafeTensorsFile

    src = make_tiny_checkpoint(tmp_path / "src", "llama", tokenizer=False)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = from_pretrained(src, mesh=mesh, rules=parallel.inference_rules())
    assert model.layers.mlp.up.get_value().sharding.spec == P(None, "tensor", None)
    out = save_pretrained(model, tmp_path / "out")
    a, b = SafeTensorsFile(src / "model.safetensors"), SafeTensorsFile(out / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)


def test_kv_head_repeats_split_heads_evenly_or_not_at_all():
    rules = parallel.inference_rules()
    tp8 = parallel.make_mesh(data=1, fsdp=1, tensor=8)
    assert parallel.kv_head_repeats(64, 8, tp8, rules) == 1  # 8 KV heads already split 8 ways
    assert parallel.kv_head_repeats(32, 2, tp8, rules) == 4  # 2 -> 8
    assert parallel.kv_head_repeats(28, 4, tp8, rules) == 1  # 28 query heads cannot group over 8 KV heads
    assert parallel.kv_head_repeats(8, 2, parallel.make_mesh(data=8), rules) == 1  # no tensor axis
    assert parallel.kv_head_repeats(8, 2, None, rules) == 1


def test_relayout_keeps_values_and_gradients():
    """Under activation sharding the value is laid out by `names` (here gathered); values and gradients equal the
    plain computation's (which layout the compiler gives the gradient is a TPU compile check)."""
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    rules = parallel.policy_rules()
    w = jax.device_put(jnp.arange(64.0 * 16).reshape(64, 16) / 100,
                       parallel.logical_to_sharding(("vocab", "embed"), mesh, rules))
    x = jnp.ones((4, 16))

    def loss(w):
        with parallel.activation_sharding(mesh, rules):
            g = parallel.relayout(w, ("vocab", None), ("vocab", "embed"))
            return jnp.sum(jnp.tanh(x @ g.T)), g

    (value, gathered), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(w)
    assert gathered.sharding.is_fully_replicated
    ref_value, ref_grad = jax.value_and_grad(lambda w: jnp.sum(jnp.tanh(x @ w.T)))(np.asarray(w))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-6)
    assert parallel.relayout(w, ("vocab", None), ("vocab", "embed")) is w  # outside activation sharding: nothing


def _constraint_specs(jaxpr) -> list:
    """The PartitionSpecs of every sharding constraint in a (closed) jaxpr, sub-jaxprs included, in order."""
    out = []
    for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            out.append(eqn.params["sharding"].spec)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(_constraint_specs(sub))
    return out


def test_relayout_backward_keeps_the_forward_layouts_after_the_context_ends():
    """The pullback of a `jax.vjp` taken under activation sharding runs after the block: its cotangent is still laid
    out by the source names (resolved at the forward, not read from the context at backward time)."""
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    rules = parallel.policy_rules()
    x = jnp.arange(8.0 * 16).reshape(8, 16) / 10

    def pulled_back_outside(x):
        with parallel.activation_sharding(mesh, rules):
            y, pullback = jax.vjp(lambda x: jnp.tanh(parallel.relayout(x, ("vocab", None), ("vocab", "embed"))), x)
        return pullback(jnp.cos(y))[0]

    specs = _constraint_specs(jax.make_jaxpr(pulled_back_outside)(x))
    assert specs == [P(None, None), P(None, "fsdp")], specs  # forward: gathered; backward: the source's FSDP layout
    got = jax.jit(pulled_back_outside)(x)
    _, identity = jax.vjp(jnp.tanh, x)
    want = identity(jnp.cos(jnp.tanh(x)))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 2)


def test_target_platform_follows_the_traced_mesh():
    from capo_jax.models.linear import weight_major

    mesh = parallel.make_mesh(data=8)
    assert parallel.target_platform() == jax.default_backend()
    with parallel.activation_sharding(mesh, parallel.policy_rules()):
        assert parallel.target_platform() == "cpu" and parallel.active_mesh() is mesh
        assert weight_major(8, jnp.float32)
    assert not weight_major(8, jnp.float32, platform="tpu")
