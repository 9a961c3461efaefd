"""The compiled sampler against transformers' PyTorch models on tiny random Llama / Qwen2 / Qwen3 checkpoints."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import transformers
from flax import nnx
from jax._src import monitoring

from capo_jax import parallel
from capo_jax.models.hf_io import from_pretrained
from capo_jax.sampling import (SamplingParams, _categorical, _unstack_layout, batch_bucket, compiled_cache_sizes,
                               first_argmax, generate, generate_text, prompt_bucket, sample_logits)
from tiny_hf import make_tiny_checkpoint, make_tokenizer

PROMPT_LENGTHS = (3, 9, 14)  # ragged, one bucket (16)
MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return {fam: make_tiny_checkpoint(root / fam, fam, tokenizer=fam == "qwen2") for fam in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="module")
def models(checkpoints):
    """(capo_jax model, transformers model) per family, both float32."""
    out = {}
    for fam, path in checkpoints.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[fam] = (from_pretrained(path), hf)
    return out


def _prompts(seed: int, lengths=PROMPT_LENGTHS, vocab: int = 256) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, size=n)] for n in lengths]


def _hf_logprobs(hf, prompt: list[int], new: list[int]) -> np.ndarray:
    """Teacher-forced float32 log-probs of `new` after `prompt` under the transformers model."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(new) - 1)
    return lp[pos, torch.tensor(new)].numpy()


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True)
SAMPLED = SamplingParams(n=4, temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_generate(models, checkpoints, family):
    model, hf = models[family]
    prompts = _prompts(1)
    res = generate(model, prompts, GREEDY, jax.random.key(0))
    assert res.tokens.shape == (3, MAX_NEW) and res.tokens.dtype == np.int32
    assert res.logprobs.dtype == np.float32 and list(res.lengths) == [MAX_NEW] * 3
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, pad_token_id=0)
        np.testing.assert_array_equal(res.tokens[i], ref[0, len(p):].numpy())
        np.testing.assert_allclose(res.logprobs[i], _hf_logprobs(hf, p, ref[0, len(p):].tolist()), atol=1e-4)
    if family == "llama":  # the scanned layer stack as is (the accelerator default) gives the same tokens
        graphdef, _ = nnx.split(model)
        assert _unstack_layout(type(model), model.config, graphdef) is not None  # CPU runs above were unstacked
        scanned = generate(model, prompts, GREEDY, jax.random.key(0), unstack_layers=False)
        np.testing.assert_array_equal(scanned.tokens, res.tokens)
        np.testing.assert_allclose(scanned.logprobs, res.logprobs, atol=1e-5)
    if family == "qwen2":  # a policy built for training (remat, layers unscanned): same tokens, per-layer cache
        trained_like = from_pretrained(checkpoints[family], remat=True, scan_layers=False)
        again = generate(trained_like, prompts, GREEDY, jax.random.key(0))
        np.testing.assert_array_equal(again.tokens, res.tokens)
        np.testing.assert_allclose(again.logprobs, res.logprobs, atol=1e-5)


@pytest.fixture(scope="module")
def sampled(models):
    """n=4 sampled rows (temperature 0.7, top-k 40, top-p 0.9) with and without prefix sharing, on Qwen3."""
    model, _ = models["qwen3"]
    prompts = _prompts(2)
    shared = generate(model, prompts, SAMPLED, jax.random.key(7))
    separate = generate(model, prompts, dataclasses.replace(SAMPLED, share_prefix=False), jax.random.key(7))
    return prompts, shared, separate


def test_sampled_logprobs_match_teacher_forcing(models, sampled):
    _, hf = models["qwen3"]
    prompts, res, _ = sampled
    assert res.tokens.shape == (12, MAX_NEW)
    for r in range(12):
        new = res.tokens[r, : res.lengths[r]].tolist()
        np.testing.assert_allclose(res.logprobs[r, : len(new)], _hf_logprobs(hf, prompts[r // 4], new), atol=1e-4)


def test_n_samples_are_distinct_and_equal_unshared_prefill(sampled):
    _, shared, separate = sampled
    for i in range(3):
        rows = {tuple(shared.tokens[i * 4 + j]) for j in range(4)}
        assert len(rows) == 4, f"prompt {i}: the 4 samples are not distinct"
    np.testing.assert_array_equal(shared.tokens, separate.tokens)
    np.testing.assert_array_equal(shared.lengths, separate.lengths)
    np.testing.assert_allclose(shared.logprobs, separate.logprobs, atol=1e-5)


def test_top_k_one_and_tiny_top_p_equal_greedy(models):
    model, _ = models["llama"]
    prompts = _prompts(1)
    greedy = generate(model, prompts, GREEDY, jax.random.key(0))
    top1 = generate(model, prompts, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=MAX_NEW, ignore_eos=True),
                    jax.random.key(3))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-6)
    # top-p alone (the full-vocabulary sort path), straight on the sampling function
    logits = jax.random.normal(jax.random.key(1), (64, 300)) * 3
    keys = jax.random.split(jax.random.key(2), 64)
    tok, lp = jax.jit(lambda lg, k: sample_logits(lg, k, greedy=False, top_k=0, use_top_p=True, temperature=1.5,
                                                  top_p=1e-6))(logits, keys)
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))
    np.testing.assert_allclose(lp, np.asarray(jax.nn.log_softmax(logits))[np.arange(64), tok], atol=1e-5)


def test_one_step_sample_frequencies_match_softmax(models):
    model, hf = models["qwen2"]
    prompt = _prompts(3, lengths=(6,))[0]
    draws = 4096
    res = generate(model, [prompt], SamplingParams(n=draws, temperature=1.0, max_new_tokens=1, ignore_eos=True),
                   jax.random.key(11))
    assert res.tokens.shape == (draws, 1)
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
    counts = np.bincount(res.tokens[:, 0], minlength=len(probs))
    expected = probs * draws
    big = expected >= 5  # pool the rare tokens into one bin (chi-square needs >= 5 expected per bin)
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    df = len(obs) - 1
    assert chi2 < df + 5 * np.sqrt(2 * df), f"chi2 {chi2:.1f} with {df} degrees of freedom"
    # and every draw's log-prob is that token's log-softmax
    np.testing.assert_allclose(res.logprobs[:, 0], np.log(probs[res.tokens[:, 0]]), atol=1e-4)


def test_stop_tokens_end_each_sequence_independently(models):
    model, _ = models["qwen2"]
    prompts = _prompts(1)
    free = generate(model, prompts, GREEDY, jax.random.key(0))
    # row 0 stops at its 3rd token; row 1 at its first token if that is a stop; the other stop ends what it ends
    stops = (int(free.tokens[0, 2]), int(free.tokens[1, 5]))
    res = generate(model, prompts, dataclasses.replace(GREEDY, stop_token_ids=stops), jax.random.key(0))
    pad = model.config.pad_token_id
    for r in range(3):
        hits = [k for k, t in enumerate(free.tokens[r]) if t in stops]
        length = hits[0] + 1 if hits else MAX_NEW
        assert res.lengths[r] == length
        np.testing.assert_array_equal(res.tokens[r, :length], free.tokens[r, :length])
        np.testing.assert_allclose(res.logprobs[r, :length], free.logprobs[r, :length], atol=1e-6)
        assert (res.tokens[r, length:] == pad).all() and (res.logprobs[r, length:] == 0).all()
    assert res.lengths[0] <= 3 and res.lengths[1] <= 6
    # the config's EOS stops too unless ignore_eos
    eos_model, _ = models["qwen2"]
    eos = eos_model.config.eos_token_id
    with_eos = generate(model, prompts, dataclasses.replace(GREEDY, ignore_eos=False, stop_token_ids=stops),
                        jax.random.key(0))
    assert all((row[:n] == eos).sum() <= 1 for row, n in zip(with_eos.tokens, with_eos.lengths))


def test_same_bucket_and_new_weights_compile_nothing(models):
    model, _ = models["llama"]
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    generate(model, _prompts(4), GREEDY, jax.random.key(0))  # compiles this bucket unless an earlier test did
    sizes = compiled_cache_sizes()
    old = model.embed.get_value()
    new = old * 1.01  # (computed before listening: the eager multiply compiles)
    monitoring.register_event_duration_secs_listener(listener)
    try:
        a = generate(model, _prompts(5, lengths=(10, 2, 16)), GREEDY, jax.random.key(1))
        # updated weights of the live model (as the trainer's policy), new stop ids, 4 prompts (same batch bucket)
        model.embed.set_value(new)
        b = generate(model, _prompts(6, lengths=(5, 5, 5, 11)), dataclasses.replace(GREEDY, stop_token_ids=(3, 7)),
                     jax.random.key(2))
    finally:
        monitoring.unregister_event_duration_listener(listener)
        model.embed.set_value(old)
    assert compiled_cache_sizes() == sizes
    assert compiles == [], f"{len(compiles)} compilations in the same bucket"
    assert a.tokens.shape == (3, MAX_NEW) and b.tokens.shape == (4, MAX_NEW)


def test_results_do_not_depend_on_bucket_padding(models, sampled):
    model, _ = models["qwen3"]
    prompts, small, _ = sampled  # batch bucket 4, length bucket 16
    big = generate(model, prompts + _prompts(9, lengths=(30, 1)), SAMPLED, jax.random.key(7))  # buckets 8, 32
    np.testing.assert_array_equal(big.tokens[:12], small.tokens)
    np.testing.assert_allclose(big.logprobs[:12], small.logprobs, atol=1e-4)


@pytest.mark.parametrize("shape", [dict(data=2, tensor=4),
                                   pytest.param(dict(data=1, fsdp=2, tensor=4), marks=pytest.mark.slow)])
def test_eight_devices_match_one(checkpoints, tmp_path_factory, shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets them)")
    # 8 heads over 4 kv heads so 'tensor'=4 really splits the cache and the attention
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), "llama", tokenizer=False,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=6)
    prompts = _prompts(10, lengths=(4, 12, 7))
    single = generate(from_pretrained(path), prompts, params, jax.random.key(9))
    mesh = parallel.make_mesh(**shape)
    sharded_model = from_pretrained(path, mesh=mesh, rules=parallel.inference_rules())
    sharded = generate(sharded_model, prompts, params, jax.random.key(9), mesh=mesh)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.lengths, single.lengths)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-4)


def test_generate_text_round_trips_strings(models):
    model, hf = models["qwen2"]
    tok = make_tokenizer()
    texts = ["hello", "a longer prompt", "2+2="]
    res = generate_text(model, tok, texts, dataclasses.replace(GREEDY, ignore_eos=False), jax.random.key(0))
    assert len(res.texts) == 3 and res.tokens.shape == (3, MAX_NEW)
    stop = {tok.eos_token_id, model.config.eos_token_id}
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id,
                          eos_token_id=sorted(stop))[0, len(ids):].tolist()
        n = int(res.lengths[i])
        assert res.tokens[i, :n].tolist() == ref[:n]
        body = ref[: n - 1] if ref[n - 1] in stop else ref[:n]
        assert res.texts[i] == tok.decode(body, skip_special_tokens=True)


def test_bad_input_raises_clear_errors(models):
    model, _ = models["llama"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 100000]], GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="generate_text"):
        generate(model, ["text"], GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    assert hash(SamplingParams(stop_token_ids=[3, 2])) == hash(SamplingParams(stop_token_ids=(2, 3)))


def test_buckets():
    assert [prompt_bucket(n) for n in (1, 8, 9, 64, 65, 130)] == [8, 8, 16, 64, 128, 192]
    assert [batch_bucket(n) for n in (1, 3, 5)] == [1, 4, 8]
    assert batch_bucket(1, 2) == 2 and batch_bucket(3, 8) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, -1.0, 2.5, 2.5, float("inf"), float("-inf"), float("nan"), 7.0]),
                         min_size=5, max_size=5), min_size=1, max_size=4))
def test_first_argmax_equals_numpy_argmax(rows):
    """Ties pick the first index, a NaN counts as the maximum (NumPy's and jnp.argmax's convention)."""
    x = np.asarray(rows, np.float32)
    assert np.asarray(first_argmax(x)).tolist() == np.argmax(x, axis=-1).tolist()


def test_categorical_draws_equal_jax_random_categorical():
    keys = jax.random.split(jax.random.key(3), 32)
    z = jax.random.normal(jax.random.key(1), (32, 300)) * 3
    ours = jax.jit(_categorical)(keys, z)
    ref = jax.jit(jax.vmap(jax.random.categorical))(keys, z)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_inference_copy_of_fsdp_master_weights_samples_the_same_tokens(checkpoints, tmp_path_factory):
    """An FSDP-sharded float32 policy's inference copy (compute dtype, inference layout, KV heads repeated so they
    split over 'tensor') generates exactly what the unsharded model generates; an already-fitting model is its own
    copy."""
    from capo_jax.sampling import InferenceCopy

    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets them)")
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("copy"), "qwen2", tokenizer=False,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    prompts = _prompts(12, lengths=(4, 11, 6, 2))
    single = generate(from_pretrained(path), prompts, GREEDY, jax.random.key(0))
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    policy = from_pretrained(path, mesh=mesh, rules=parallel.policy_rules())
    copy = InferenceCopy(policy, mesh)
    rollout = copy.refresh(policy)
    assert copy.repeats == 2 and rollout.config.num_kv_heads == 4  # 2 KV heads over tensor=4
    k = nnx.state(rollout)["layers"]["attn"]["k"][...]
    assert k.shape[1] == 4 and k.sharding.spec[1] == "tensor" and k.sharding.spec[3] is None  # embed not FSDP
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(nnx.state(rollout)))
    got = generate(rollout, prompts, GREEDY, jax.random.key(0), mesh=mesh)
    np.testing.assert_array_equal(got.tokens, single.tokens)
    np.testing.assert_allclose(got.logprobs, single.logprobs, atol=1e-4)
    unsharded = from_pretrained(path)
    assert InferenceCopy(unsharded, None).refresh(unsharded) is unsharded
    bf16 = InferenceCopy(from_pretrained(path, dtype="bfloat16", param_dtype="float32"), None)
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(nnx.state(bf16.refresh(unsharded))))
