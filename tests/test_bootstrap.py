"""The demo bootstrap: a tiny policy trains on noisy solutions, its loss falls, the folder loads, the cache is reused
(in its folder, and across workdirs through the user cache keyed by the settings hash)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from capo_jax.demo.bootstrap import (MODEL_DEFAULTS, SFT_DEFAULTS, bootstrap_policy, bootstrap_settings, cache_root,
                                     cached_bootstrap, settings_hash, sft_data)

TINY_WORLD = {"min_ops": 1, "max_ops": 2, "num_test": 8}
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "max_position_embeddings": 96}
TINY_SFT = {"steps": 40, "batch_size": 16, "warmup_steps": 5, "learning_rate": 1e-2, "num_eval": 4}


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("boot"))
    logs: list[str] = []
    path = bootstrap_policy(out, world=TINY_WORLD, model=TINY_MODEL, sft=TINY_SFT, log=logs.append)
    return path, logs


def test_tiny_bootstrap_trains_and_its_loss_falls(booted):
    path, logs = booted
    marker = json.load(open(os.path.join(path, "bootstrap.json")))
    m = marker["metrics"]
    assert m["final_loss"] < 0.6 * m["first_loss"]
    assert 0.0 <= m["greedy_accuracy"] <= 1.0 and 0.0 <= m["sampled_accuracy"] <= 1.0 and m["problems"] == 4
    assert m["sampled_pairs"] == 8 and m["greedy_pairs"] == 4
    assert any("step 40/40" in line for line in logs)
    assert marker["settings"]["sft"]["steps"] == 40 and marker["settings"]["model"]["hidden_size"] == 32


def test_saved_folder_loads_in_capo_jax_and_transformers(booted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capo_jax.models import from_pretrained

    path, _ = booted
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Compute (3 + 4) * 2.\n3 + 4 = 7")["input_ids"]
    ours = np.asarray(from_pretrained(path)(np.asarray([ids], np.int32)))[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert hf.config.vocab_size == len(tok) and hf.config.eos_token_id == tok.eos_token_id
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_second_call_reuses_the_cache_and_new_settings_retrain(booted, tmp_path):
    path, _ = booted
    weights = os.path.join(path, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    logs: list[str] = []
    assert bootstrap_policy(path, world=TINY_WORLD, model=TINY_MODEL, sft=TINY_SFT, log=logs.append) == path
    assert os.stat(weights).st_mtime_ns == before
    assert len(logs) == 1 and "reusing" in logs[0]
    # Other settings must not reuse it: retrain a copy with a changed setting.
    other = str(tmp_path / "other")
    shutil.copytree(path, other)
    logs = []
    bootstrap_policy(other, world=TINY_WORLD, model=TINY_MODEL, sft={**TINY_SFT, "steps": 2, "num_eval": 0},
                     log=logs.append)
    assert any("other settings: retraining" in line for line in logs)
    assert json.load(open(os.path.join(other, "bootstrap.json")))["settings"]["sft"]["steps"] == 2


def test_sft_data_is_noisy_at_the_requested_rate():
    from capo_jax.critic.rule import true_wrong_steps
    from capo_jax.data.arithmetic import ArithmeticWorld
    from capo_jax.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    world = ArithmeticWorld({"num_test": 10})
    ids, mask = sft_data(world, tok, 400, {**SFT_DEFAULTS, "noise_prob": 0.25, "stop_short_prob": 0.0}, seed=0)
    wrong = steps = 0
    for row, m in zip(ids, mask):
        completion = tok.decode(row[m > 0], skip_special_tokens=True)
        parts = completion.split("\n\n")
        assert parts[-1].startswith("The answer is \\boxed{")
        wrong += len(true_wrong_steps(parts))
        steps += len(parts) - 1
        assert row[m > 0][-1] == tok.eos_token_id and row[0] == tok.bos_token_id
    assert abs(wrong / steps - 0.25) < 4 * np.sqrt(0.25 * 0.75 / steps)


def test_sft_data_stops_long_solutions_short_at_the_requested_rate():
    from capo_jax.critic.rule import true_wrong_steps
    from capo_jax.data.arithmetic import ArithmeticWorld
    from capo_jax.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    world = ArithmeticWorld({"num_test": 10})
    sft = {**SFT_DEFAULTS, "noise_prob": 0.0, "stop_short_prob": 0.6, "stop_short_ops": 4}
    ids, mask = sft_data(world, tok, 600, sft, seed=0)
    long_ = stopped = 0
    for row, m in zip(ids, mask):
        question = tok.decode(row[(m == 0) & (row != tok.pad_token_id)], skip_special_tokens=True).strip()
        parts = tok.decode(row[m > 0], skip_special_tokens=True).split("\n\n")
        n_ops = question.count(" + ") + question.count(" - ") + question.count(" * ")
        wrong = true_wrong_steps(parts, question)
        if n_ops < 4:
            assert not wrong and len(parts) == n_ops + 1
            continue
        long_ += 1
        stopped += len(parts) == n_ops
        assert wrong == ({n_ops - 1} if len(parts) == n_ops else set())  # the premature box is the one wrong step
    assert long_ > 100
    assert abs(stopped / long_ - 0.6) < 4 * np.sqrt(0.24 / long_)


def test_bad_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown demo.model settings \\['hiden_size'\\]"):
        bootstrap_policy(str(tmp_path), model={"hiden_size": 8})
    with pytest.raises(ValueError, match="llama or qwen2"):
        bootstrap_policy(str(tmp_path), model={**MODEL_DEFAULTS, "model_type": "gpt2"})


def test_the_user_cache_is_shared_by_workdirs_and_keyed_by_the_settings(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    settings = dict(world=TINY_WORLD, model=TINY_MODEL, sft={**TINY_SFT, "steps": 3, "num_eval": 0})
    logs: list[str] = []
    first = cached_bootstrap(cache, log=logs.append, **settings)
    assert first == os.path.join(cache, "bootstrap", settings_hash(bootstrap_settings(**settings)))
    assert any("step 3/3" in line for line in logs) and os.path.exists(os.path.join(first, "model.safetensors"))
    assert os.listdir(os.path.join(cache, "bootstrap")) == [os.path.basename(first)]  # no partial folder left
    mtime = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    logs = []
    assert cached_bootstrap(cache, log=logs.append, **settings) == first  # a second workdir: no training
    assert logs == [f"[bootstrap] reusing the cached bootstrap {first}"]
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == mtime
    other = cached_bootstrap(cache, log=logs.append, **{**settings, "sft": {**settings["sft"], "seed": 1}})
    assert other != first and os.path.isdir(other)
    # a half-written folder under the hash (a build killed before the rename is never one; a damaged one can be)
    os.remove(os.path.join(first, "bootstrap.json"))
    logs = []
    assert cached_bootstrap(cache, log=logs.append, **settings) == first
    assert any("step 3/3" in line for line in logs) and os.path.exists(os.path.join(first, "bootstrap.json"))
    # where the cache lives: the argument, else $CAPO_JAX_CACHE, else $XDG_CACHE_HOME/capo_jax
    monkeypatch.setenv("CAPO_JAX_CACHE", str(tmp_path / "env"))
    assert cache_root("") == str(tmp_path / "env") and cache_root(cache) == cache
    monkeypatch.delenv("CAPO_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root("") == str(tmp_path / "xdg" / "capo_jax")


def _fake_build(out_dir, digest, who):
    """A finished bootstrap folder as `bootstrap_policy` leaves one (what `_finished` checks), marked by its builder."""
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"built_by": who}, f)
    with open(os.path.join(out_dir, "bootstrap.json"), "w") as f:
        json.dump({"settings_hash": digest}, f)


def _built_by(path):
    return json.load(open(os.path.join(path, "config.json")))["built_by"]


def test_two_builders_of_one_cache_end_with_one_folder_the_first_ones(tmp_path):
    from capo_jax.demo import bootstrap

    ids = {bootstrap.builder_id() for _ in range(3)}
    host = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in __import__("socket").gethostname())
    assert len(ids) == 3 and all(i.startswith(f"{host}-{os.getpid()}-") for i in ids)  # private per builder, per host
    final, digest = str(tmp_path / "bootstrap" / "abc"), "abc"
    os.makedirs(os.path.dirname(final))
    first, second = f"{final}.partial-a", f"{final}.partial-b"
    _fake_build(first, digest, "a")
    _fake_build(second, digest, "b")
    logs = []
    assert bootstrap.finalize(first, final, digest, logs.append) == final
    assert bootstrap.finalize(second, final, digest, logs.append) == final  # the loser uses the winner's folder
    assert _built_by(final) == "a" and os.path.isdir(second) and "finished first" in logs[-1]
    # a broken leftover under the hash (no marker) is replaced, never merged into
    shutil.rmtree(final)
    os.makedirs(final)
    open(os.path.join(final, "config.json"), "w").write("{}")
    assert bootstrap.finalize(second, final, digest, logs.append) == final and _built_by(final) == "b"
    assert sorted(os.listdir(tmp_path / "bootstrap")) == ["abc"]


def test_a_builder_that_loses_the_race_returns_the_winners_folder_and_leaves_no_partial(tmp_path, monkeypatch):
    from capo_jax.demo import bootstrap

    cache = str(tmp_path / "cache")
    digest = settings_hash(bootstrap_settings(world=TINY_WORLD))
    final = os.path.join(cache, "bootstrap", digest)
    partials = []

    def build_while_another_host_finishes(out_dir, **_):
        partials.append(out_dir)
        _fake_build(out_dir, digest, "us")
        other = f"{final}.partial-otherhost-{os.getpid()}-0"  # the same pid on another host: another name
        assert other != out_dir
        _fake_build(other, digest, "other host")
        bootstrap.finalize(other, final, digest, lambda m: None)
        return out_dir

    monkeypatch.setattr(bootstrap, "bootstrap_policy", build_while_another_host_finishes)
    logs = []
    assert cached_bootstrap(cache, world=TINY_WORLD, log=logs.append) == final
    assert _built_by(final) == "other host" and os.listdir(os.path.dirname(final)) == [digest]
    assert os.path.basename(partials[0]).startswith(f"{digest}.partial-") and not os.path.exists(partials[0])

    def failing_build(out_dir, **_):
        partials.append(out_dir)
        _fake_build(out_dir, digest, "half")
        raise RuntimeError("killed")

    shutil.rmtree(final)
    monkeypatch.setattr(bootstrap, "bootstrap_policy", failing_build)
    with pytest.raises(RuntimeError, match="killed"):
        cached_bootstrap(cache, world=TINY_WORLD, log=logs.append)
    assert os.listdir(os.path.dirname(final)) == []  # a failed build removes its own partial folder
