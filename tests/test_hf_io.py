"""Hugging Face in/out: round trips through transformers, sharded folders, old configs, and refused bad input."""
import json
import shutil

import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings

from capo_jax.models import CheckpointError, forward, from_pretrained, save_pretrained
from capo_jax.models.hf_io import INDEX_FILE, parse_size
from capo_jax.models.safetensors_io import SafeTensorsFile, SafetensorsError, write_safetensors
from tiny_hf import make_tiny_checkpoint, make_tiny_model

IDS = np.random.RandomState(0).randint(0, 260, (2, 11)).astype(np.int32)


def _hf_logits(folder_or_model, ids=IDS):
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """family -> folder of a tiny checkpoint with tokenizer."""
    return {fam: make_tiny_checkpoint(tmp_path_factory.mktemp(f"src_{fam}"), fam, seed=2)
            for fam in ("llama", "qwen2", "qwen3")}


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_round_trip_through_transformers(ckpts, family, tmp_path):
    src = ckpts[family]
    model = from_pretrained(src)
    out = save_pretrained(model, tmp_path / "out", tokenizer_dir=src)
    assert (out / "model.safetensors").is_file() and not (out / INDEX_FILE).exists()
    np.testing.assert_array_equal(_hf_logits(out), _hf_logits(src))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("a+b=c")["input_ids"]) == "a+b=c"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["dtype"] == "float32"
    # and back into capo_jax
    again = from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(forward(again, IDS)), np.asarray(forward(model, IDS)))


def test_sharded_export_writes_an_index_and_loads(ckpts, tmp_path):
    src = ckpts["qwen3"]
    model = from_pretrained(src, scan_layers=False)
    out = save_pretrained(model, tmp_path / "out", max_shard_size="60KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(SafeTensorsFile(out / s).shape(k))) * 4 for k, s in index["weight_map"].items())
    np.testing.assert_array_equal(_hf_logits(out), _hf_logits(src))
    # scanned (reloaded) vs unscanned (exported) layers: same weights, float rounding may differ slightly
    np.testing.assert_allclose(np.asarray(forward(from_pretrained(out), IDS)), np.asarray(forward(model, IDS)),
                               atol=1e-5)


def test_reads_a_sharded_folder_written_by_transformers(tmp_path):
    hf = make_tiny_model("qwen2", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / INDEX_FILE).is_file()
    ref = _hf_logits(hf)
    got = np.asarray(forward(from_pretrained(tmp_path), IDS))
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_bfloat16_export_and_import(ckpts, tmp_path):
    src = ckpts["llama"]
    model = from_pretrained(src)
    out = save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    f = SafeTensorsFile(out / "model.safetensors")
    emb = f.get("model.embed_tokens.weight")
    assert emb.dtype == ml_dtypes.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ref = SafeTensorsFile(src / "model.safetensors").get("model.embed_tokens.weight")
    np.testing.assert_array_equal(emb, ref.astype(ml_dtypes.bfloat16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    back = from_pretrained(out, dtype="float32")  # bf16 on disk, upcast on load
    np.testing.assert_array_equal(np.asarray(back.embed.get_value()), ref.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_old_style_config_loads_the_same(ckpts, tmp_path):
    folder = _copy(ckpts["llama"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    (folder / "config.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(np.asarray(forward(from_pretrained(folder), IDS)),
                                  np.asarray(forward(from_pretrained(ckpts["llama"]), IDS)))


# ----------------------------------------------------------------------------- bad input


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 this would be a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loads pickle"):
        from_pretrained(tmp_path)


def test_unsupported_model_type(ckpts, tmp_path):
    folder = _copy(ckpts["qwen2"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma2"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'gemma2' is not supported"):
        from_pretrained(folder)


def test_truncated_safetensors(ckpts, tmp_path):
    folder = _copy(ckpts["qwen2"], tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors.*truncated"):
        from_pretrained(folder)


def test_shape_mismatch_names_the_key(ckpts, tmp_path):
    folder = _copy(ckpts["qwen2"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight in model\.safetensors"):
        from_pretrained(folder)


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    f = SafeTensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    edit(tensors)
    write_safetensors(path, tensors.items())


def test_unconsumed_key_is_an_error(ckpts, tmp_path):
    folder = _copy(ckpts["qwen3"], tmp_path)
    _rewrite(folder, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"does not consume.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        from_pretrained(folder)


def test_missing_key_is_an_error(ckpts, tmp_path):
    folder = _copy(ckpts["qwen3"], tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.layers\.1\.self_attn\.k_norm\.weight"):
        from_pretrained(folder)


def test_index_naming_a_missing_shard(tmp_path):
    hf = make_tiny_model("llama", seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        from_pretrained(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), junk=st.binary(max_size=64), flip=st.integers(0, 300))
def test_damaged_safetensors_only_raise_safetensors_errors(tmp_path, cut, junk, flip):
    good = tmp_path / "good.safetensors"
    if not good.exists():
        write_safetensors(good, [("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
                                 ("b", np.ones(4, ml_dtypes.bfloat16))])
    data = bytearray(good.read_bytes())
    if flip < len(data):
        data[flip] ^= 0xFF
    data = bytes(data[:max(0, len(data) - cut)]) + junk
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    try:
        f = SafeTensorsFile(bad)
        for k in f.keys():
            f.get(k)  # whatever parsed must be readable within the file
    except SafetensorsError:
        pass
