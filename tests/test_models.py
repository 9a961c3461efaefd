"""The decoder against transformers' PyTorch models (logits, padding, RoPE), the KV cache, scan/unscan, remat."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from capo_jax.models import KVCache, ModelConfig, Transformer, create_model, forward, from_pretrained, init_cache
from capo_jax.models.transformer import rope_inv_freq
from tiny_hf import make_tiny_model

FAMILIES = ("llama", "qwen2", "qwen3")
T = 40  # long enough that llama3's scaled low frequencies move the logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (torch model, saved folder)."""
    out = {}
    for fam in FAMILIES:
        model = make_tiny_model(fam, seed=1)
        folder = tmp_path_factory.mktemp(fam)
        model.save_pretrained(folder)
        out[fam] = (model, folder)
    return out


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def _ids(batch, length, seed=0, vocab=272):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny, family):
    hf, folder = tiny[family]
    ids = _ids(2, T)
    ref = _torch_logits(hf, ids)
    model = from_pretrained(folder)
    out = np.asarray(forward(model, ids))
    assert out.dtype == np.float32 and out.shape == (2, T, hf.config.vocab_size)
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_equals_unpadded_row(tiny, family):
    hf, folder = tiny[family]
    model = from_pretrained(folder)
    ids = _ids(2, 16, seed=2)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    out = np.asarray(forward(model, ids, mask))
    alone = _torch_logits(hf, ids[:1, 5:])
    full = _torch_logits(hf, ids[1:])
    scale = np.abs(full).max()
    assert np.abs(out[0, 5:] - alone[0]).max() < 1e-4 * scale
    assert np.abs(out[1] - full[0]).max() < 1e-4 * scale
    # and transformers' own left-padded forward (explicit positions as generate computes them)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    assert np.abs(out[0, 5:] - ref[0, 5:]).max() < 1e-4 * scale
    explicit = np.asarray(forward(model, ids, mask, pos))
    np.testing.assert_allclose(explicit, out, atol=1e-6)


def test_llama3_rope_frequencies_match_transformers(tiny):
    hf, folder = tiny["llama"]
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg.rope_scaling["rope_type"] == "llama3"
    ours = rope_inv_freq(cfg)
    theirs = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    assert not np.allclose(plain, ours)  # the scaling really changes something at this size


def test_old_style_rope_config_reads_the_same(tiny):
    _, folder = tiny["llama"]
    new = json.loads((folder / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rp = dict(new["rope_parameters"])
    old["rope_theta"] = rp.pop("rope_theta")
    old["rope_scaling"] = dict(rp, type=rp.pop("rope_type"))  # the pre-transformers-4.45 key name
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new)
    qwen = {**old, "model_type": "qwen2", "rope_scaling": None, "rope_theta": 1e6}
    cfg = ModelConfig.from_hf(qwen)
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6 and cfg.attention_bias and not cfg.attention_out_bias


@pytest.mark.parametrize("bad, message", [
    ({"use_sliding_window": True}, "sliding-window"),
    ({"model_type": "gpt2"}, "not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_size": None}, r"lacks required field\(s\) \['hidden_size'\]"),
])
def test_unsupported_configs_are_refused(tiny, bad, message):
    _, folder = tiny["qwen2"]
    hf = {**json.loads((folder / "config.json").read_text()), **bad}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_config_round_trips_through_hf_dict():
    for fam, kw in [("llama", dict(tie_word_embeddings=True, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192))),
            ("qwen2", dict(attention_bias=True)), ("qwen3", dict(qk_norm=True, head_dim=24))]:
        cfg = ModelConfig(model_type=fam, eos_token_id=[5, 6], **kw)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
        hash(cfg)


def _decode_all(model, ids, mask, prefill, max_len, chunk=1, per_layer=False):
    """Prefill `prefill` tokens, then feed the rest `chunk` at a time through the cache; all logits."""
    cache = init_cache(model.config, ids.shape[0], max_len, per_layer=per_layer)
    logits, cache = forward(model, ids[:, :prefill], mask[:, :prefill], cache=cache)
    outs = [np.asarray(logits)]
    for s in range(prefill, ids.shape[1], chunk):
        logits, cache = forward(model, ids[:, s:s + chunk], mask[:, s:s + chunk], cache=cache)
        outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked_cache", "per_layer_cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_full_forward(tiny, family, per_layer):
    _, folder = tiny[family]
    model = from_pretrained(folder, scan_layers=not per_layer)
    ids = _ids(3, 14, seed=3)
    mask = np.ones_like(ids)
    mask[0, :4] = 0      # left padding
    mask[1, :1] = 0
    mask[2, 10] = 0      # a row that skips a decode step (finished rows feed masked tokens)
    full = np.asarray(forward(model, ids, mask))
    cached, cache = _decode_all(model, ids, mask, prefill=7, max_len=20, per_layer=per_layer)
    assert cache.per_layer == per_layer and cache.max_len == 20
    valid = mask.astype(bool)
    scale = np.abs(full).max()
    assert np.abs(cached[valid] - full[valid]).max() < 1e-5 * scale
    assert int(cache.index) == 14 and cache.mask[:, :14].tolist() == valid.tolist()
    assert not cache.mask[:, 14:].any()


def test_decode_step_is_jittable_and_chunked_prefill_agrees(tiny):
    _, folder = tiny["qwen3"]
    model = from_pretrained(folder)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tok, mask, cache):
        return nnx.merge(graphdef, state)(tok, attention_mask=mask, cache=cache)

    ids = _ids(2, 12, seed=4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    full = np.asarray(forward(model, ids, mask))
    cache = init_cache(model.config, 2, 16)
    outs = []
    for s in range(0, 12, 3):  # prefill in chunks of 3 through the same compiled function
        logits, cache = step(state, ids[:, s:s + 3], mask[:, s:s + 3], cache)
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, 1)
    assert np.abs(got[mask == 1] - full[mask == 1]).max() < 1e-5 * np.abs(full).max()
    assert step._cache_size() == 1


def _random_model(**kw):
    cfg = ModelConfig(model_type="qwen3", qk_norm=True, head_dim=12, num_layers=2, vocab_size=97, **kw)
    return create_model(cfg, seed=0)


def test_scanned_and_unscanned_layers_agree():
    scanned = _random_model(scan_layers=True)
    unscanned = _random_model(scan_layers=False)
    # copy the stacked weights into the per-layer modules
    for i, block in enumerate(unscanned.layers):
        src = jax.tree.map(lambda a: a[i], nnx.state(scanned.layers))
        nnx.update(block, src)
    for name in ("embed", "lm_head"):
        getattr(unscanned, name).set_value(getattr(scanned, name).get_value())
    ids = _ids(2, 9, vocab=97)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    a = np.asarray(forward(scanned, ids, mask))
    b = np.asarray(forward(unscanned, ids, mask))
    np.testing.assert_allclose(a, b, atol=1e-5)
    ca, _ = _decode_all(scanned, ids, mask, 5, 12)
    cb, _ = _decode_all(unscanned, ids, mask, 5, 12)
    np.testing.assert_allclose(ca, cb, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_gives_same_values_and_gradients(scan_layers):
    plain = _random_model(remat=False, scan_layers=scan_layers)
    remat = _random_model(remat=True, scan_layers=scan_layers)
    ids = _ids(2, 7, vocab=97)

    def loss(model):
        logp = jax.nn.log_softmax(model(ids[:, :-1]))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    grad = nnx.jit(nnx.value_and_grad(loss))
    la, ga = grad(plain)
    lb, gb = grad(remat)
    jaxpr = str(jax.make_jaxpr(lambda s: loss(nnx.merge(nnx.graphdef(remat), s)))(nnx.state(remat)))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ga))


def test_compiled_program_does_not_grow_with_depth():
    def size(layers):
        model = nnx.eval_shape(lambda: Transformer(ModelConfig(num_layers=layers), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.zeros((1, 4), jnp.int32))
        return len(str(jaxpr).splitlines())
    assert size(2) == size(8)


def test_parameters_carry_logical_names():
    model = _random_model(attention_bias=True, attention_out_bias=True)
    allowed = {"embed", "vocab", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim and set(names) <= allowed, (path, names)
        assert (names[0] == "layers") == (path[0] == "layers")
    spec = nnx.get_partition_spec(nnx.state(model))
    assert spec["layers"]["attn"]["q"].get_value() == jax.sharding.PartitionSpec("layers", "heads", "head_dim", "embed")


def test_bfloat16_compute_is_close_and_returns_float32_logits(tiny):
    _, folder = tiny["qwen2"]
    f32 = from_pretrained(folder)
    bf16 = from_pretrained(folder, dtype="bfloat16")
    mixed = from_pretrained(folder, dtype="bfloat16", param_dtype="float32")
    assert bf16.embed.get_value().dtype == jnp.bfloat16 and mixed.embed.get_value().dtype == jnp.float32
    ids = _ids(2, 10, seed=5)
    ref = np.asarray(forward(f32, ids))
    for m in (bf16, mixed):
        out = forward(m, ids)
        assert out.dtype == jnp.float32
        assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()
    hidden = bf16.hidden_states(ids)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (2, 10, 64)
    np.testing.assert_allclose(bf16.logits(hidden), forward(bf16, ids), atol=1e-6)


def test_init_cache_shapes_and_hidden_states_with_cache():
    model = _random_model()
    cfg = model.config
    cache = init_cache(cfg, 2, 8, jnp.bfloat16)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 8, cfg.head_dim) and cache.k.dtype == jnp.bfloat16
    assert cache.mask.shape == (2, 8) and cache.index.dtype == jnp.int32
    ids = _ids(2, 5, vocab=97)
    hidden, new = nnx.jit(lambda m, ids, c: m.hidden_states(ids, cache=c))(model, ids, cache)
    assert hidden.shape == (2, 5, cfg.hidden_size) and int(new.index) == 5
    # a bfloat16 cache still reproduces the float32 forward closely
    np.testing.assert_allclose(model.logits(hidden), forward(model, ids), atol=0.05)
    # per-layer buffers: one [B, KV, S, D] array per layer; a scanned stack refuses them with the fix
    per_layer = init_cache(cfg, 2, 8, per_layer=True)
    assert len(per_layer.k) == cfg.num_layers and per_layer.v[0].shape == (2, cfg.num_kv_heads, 8, cfg.head_dim)
    assert cfg.scan_layers
    with pytest.raises(ValueError, match="per_layer=False"):
        model.hidden_states(ids, cache=per_layer)


# config.json files as published (Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct), pre-transformers-5 layout
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
    "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}


def test_published_configs_read_correctly():
    q = ModelConfig.from_hf(QWEN25_05B)
    assert (q.head_dim, q.num_kv_heads, q.tie_word_embeddings, q.attention_bias, q.attention_out_bias, q.qk_norm,
            q.rope_theta, q.rope_scaling) == (64, 2, True, True, False, False, 1e6, None)
    ll = ModelConfig.from_hf(LLAMA32_1B)
    assert ll.eos_token_id == (128001, 128008, 128009) and ll.rope_scaling["factor"] == 32.0
    assert ll.rope_scaling["original_max_position_embeddings"] == 8192 and not ll.attention_bias
    # and what transformers makes of them: same RoPE frequencies
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.LlamaConfig(**LLAMA32_1B)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    np.testing.assert_allclose(rope_inv_freq(ll), theirs.numpy(), rtol=1e-6)


def test_cache_overflow_is_refused_outside_jit():
    model = _random_model()
    cache = init_cache(model.config, 1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(_ids(1, 5, vocab=97), cache=cache)


def test_empty_cache_prefill_attends_among_its_own_tokens(tiny):
    """A prefill into an empty cache (blockwise causal over the new tokens) equals attention over every cache slot,
    and writes the same keys and values."""
    _, folder = tiny["qwen2"]
    model = from_pretrained(folder)
    ids = _ids(3, 11, seed=5)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    graphdef, state = nnx.split(model)

    def prefill(empty):
        def run(state, ids, mask):
            cache = init_cache(model.config, 3, 24)
            return nnx.merge(graphdef, state).hidden_states(ids, mask, cache=cache, empty_cache=empty)
        return jax.jit(run)(state, ids, mask)

    h_block, c_block = prefill(True)
    h_full, c_full = prefill(False)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(h_block)[valid] - np.asarray(h_full)[valid]).max() < 1e-5 * np.abs(h_full).max()
    # keys of real tokens agree (a pad slot's key is never read: its mask bit is off in both caches)
    k_block, k_full = np.asarray(c_block.k)[:, :, :, :11], np.asarray(c_full.k)[:, :, :, :11]
    np.testing.assert_allclose(k_block.transpose(1, 3, 0, 2, 4)[valid], k_full.transpose(1, 3, 0, 2, 4)[valid],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c_block.mask), np.asarray(c_full.mask))
    assert int(c_block.index) == int(c_full.index) == 11


def test_repeated_kv_heads_give_the_same_logits():
    from capo_jax.models.transformer import repeat_kv_heads

    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=8, attention_bias=True, model_type="qwen2")
    model = create_model(cfg, seed=1)
    graphdef, state = nnx.split(model)
    new_cfg, new_state = repeat_kv_heads(cfg, state, 2)
    assert new_cfg.num_kv_heads == 4 and new_state["layers"]["attn"]["k"][...].shape[1] == 4
    twin = nnx.merge(nnx.split(nnx.eval_shape(lambda: Transformer(new_cfg, rngs=nnx.Rngs(0))))[0], new_state)
    ids = _ids(2, 9, seed=6, vocab=97)
    np.testing.assert_allclose(np.asarray(forward(twin, ids)), np.asarray(forward(model, ids)), rtol=1e-5, atol=1e-5)
