"""Hugging Face hub ids as model paths, resolved offline from a hub-layout cache that holds tiny random checkpoints."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from capo_jax import hub
from capo_jax.config import ConfigError, get_default_config, validate

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An HF hub cache with tiny-org/policy and tiny-org/reference (qwen2) and tiny-org/critic (llama), as a download
    would leave it."""
    from tiny_hf import add_to_hub_cache, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub"
    policy = make_tiny_checkpoint(root / "policy", "qwen2", hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, num_key_value_heads=2)
    reference = make_tiny_checkpoint(root / "reference", "qwen2", seed=2, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=4, num_key_value_heads=2)
    critic = make_tiny_checkpoint(root / "critic", "llama", seed=1, hidden_size=32, intermediate_size=64)
    add_to_hub_cache(policy, cache, "tiny-org/policy", commit=COMMIT)
    add_to_hub_cache(reference, cache, "tiny-org/reference", commit="e" * 40)
    add_to_hub_cache(critic, cache, "tiny-org/critic", commit="f" * 40)
    return dict(cache=str(cache), policy=str(policy), critic=str(critic), reference=str(reference))


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache["cache"])
    return hub_cache


def test_the_cache_has_huggingface_hubs_own_layout(hub_cache):
    """huggingface_hub's cache scanner reads the fixture as a cache with both repositories (an independent check)."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub_cache["cache"])
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"tiny-org/policy", "tiny-org/reference", "tiny-org/critic"}
    (rev,) = repos["tiny-org/policy"].revisions
    assert rev.commit_hash == COMMIT and "main" in rev.refs
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.file_name for f in rev.files}


@pytest.mark.parametrize("value, parsed", [
    ("Qwen/Qwen2.5-1.5B-Instruct", ("Qwen/Qwen2.5-1.5B-Instruct", None)),
    ("meta-llama/Llama-3.2-1B@main", ("meta-llama/Llama-3.2-1B", "main")),
    ("owner/name@refs/pr/3", ("owner/name", "refs/pr/3")),
    ("/models/qwen", None), ("./models/qwen", None), ("~/models/qwen", None), ("runs/a/b", None),
    ("gs://bucket/model", None), ("owner--x/name", None), ("owner/name.", None), ("owner/name@", None), ("", None),
])
def test_parse_hub_id(value, parsed):
    assert hub.parse_hub_id(value) == parsed


def test_an_existing_folder_is_a_path_even_when_it_reads_as_an_id(tmp_path, monkeypatch):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_id("owner/name") is None and hub.resolve("owner/name") == "owner/name"


@given(st.text(max_size=40))
def test_parse_hub_id_on_any_text(text):
    """Never raises; whatever it accepts is owner/name[@revision] with no whitespace and splits back into the text."""
    parsed = hub.parse_hub_id(text)
    if parsed is not None:
        repo, revision = parsed
        assert repo.count("/") == 1 and not any(c.isspace() for c in repo + (revision or ""))
        assert text.strip() == (repo if revision is None else f"{repo}@{revision}")


@pytest.mark.parametrize("suffix", ["", "@main", f"@{COMMIT}"])
def test_offline_resolution_finds_the_snapshot(offline_cache, suffix):
    folder = hub.resolve("tiny-org/policy" + suffix)
    assert folder == os.path.join(offline_cache["cache"], "models--tiny-org--policy", "snapshots", COMMIT)
    assert open(os.path.join(folder, "config.json")).read() == open(os.path.join(offline_cache["policy"], "config.json")).read()


def test_hf_home_locates_the_cache(hub_cache, monkeypatch, tmp_path):
    import shutil

    home = tmp_path / "hf_home"
    shutil.copytree(hub_cache["cache"], home / "hub", symlinks=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve("tiny-org/critic").startswith(str(home / "hub"))


def test_offline_miss_names_the_id_and_the_variable(offline_cache):
    with pytest.raises(ConfigError) as err:
        hub.resolve("tiny-org/absent", key="critic.path")
    message = str(err.value)
    assert "\n" not in message and "critic.path='tiny-org/absent'" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        hub.resolve("tiny-org/policy@v9")  # a branch the cache has no ref for


def test_a_snapshot_without_safetensors_is_refused(tmp_path, monkeypatch):
    from tiny_hf import add_to_hub_cache

    src = tmp_path / "bin_only"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\0")
    add_to_hub_cache(src, tmp_path / "hub", "old/bin-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="no .safetensors weights"):
        hub.resolve("old/bin-model")


def test_online_download_asks_for_weights_configs_and_tokenizer_only(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        (tmp_path / "model.safetensors").write_bytes(b"")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.resolve("Qwen/Qwen2.5-0.5B-Instruct@v1") == str(tmp_path)
    assert seen["repo_id"] == "Qwen/Qwen2.5-0.5B-Instruct" and seen["revision"] == "v1"
    assert seen["local_files_only"] is False and seen["cache_dir"] == str(tmp_path / "cache")
    from huggingface_hub.utils import filter_repo_objects

    files = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "README.md",
             "onnx/model.onnx", "flax_model.msgpack"]
    kept = set(filter_repo_objects(files, allow_patterns=seen["allow_patterns"]))
    assert kept == set(files[:8])


def _config(workdir, policy, critic, reference=""):
    c = get_default_config()
    c.workdir = str(workdir)
    c.policy.path, c.critic.path, c.reference.path = policy, critic, reference
    c.rl.kl_coef = 0.01
    c.rollout.prompts_per_step, c.rollout.group_size = 2, 4
    c.rollout.max_prompt_len, c.rollout.max_new_tokens = 64, 16
    c.rl.micro_batch_size, c.rl.logprob_chunk = 8, 8
    c.critic.dtype, c.critic.max_prompt_tokens = "float32", 2048
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    c.checkpoint.async_save = False
    return c


def test_validation_accepts_hub_ids_and_still_refuses_missing_folders(tmp_path):
    validate(_config(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct@main", "owner/ref"))
    with pytest.raises(ConfigError, match="policy.path='/no/such/model' does not exist"):
        validate(_config(tmp_path, "/no/such/model", "Qwen/Qwen2.5-1.5B-Instruct"))
    with pytest.raises(ConfigError, match="critic.path='./missing/critic' does not exist"):
        validate(_config(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct", "./missing/critic"))


def test_gs_workdir_is_refused_with_the_mount_advice():
    with pytest.raises(ConfigError, match="gcsfuse"):
        validate(_config("gs://bucket/run", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"))


def test_resolve_model_paths_touches_only_the_roles_the_run_loads(offline_cache):
    c = _config("w", "tiny-org/policy", "tiny-org/absent", "tiny-org/reference")
    c.reward.mode = "grpo"  # no critic loaded: its (missing) id is never resolved
    out = hub.resolve_model_paths(c)
    assert out.policy.path.endswith(COMMIT) and out.reference.path.endswith("e" * 40)
    assert out.critic.path == "tiny-org/absent" and c.policy.path == "tiny-org/policy"


def _same_params(model, tree):
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_loads_every_role_from_hub_ids_and_stores_the_ids(offline_cache, tmp_path):
    """Run(config) with three hub ids: the snapshots are what gets loaded, the workdir's config keeps the ids."""
    from capo_jax.models import from_pretrained
    from capo_jax.rl.loop import Run

    ids = ("tiny-org/policy", "tiny-org/critic@main", f"tiny-org/reference@{'e' * 40}")
    run = Run(_config(tmp_path / "w", *ids))
    try:
        assert run.policy_path == os.path.join(offline_cache["cache"], "models--tiny-org--policy", "snapshots", COMMIT)
        _same_params(from_pretrained(offline_cache["policy"]), nnx.state(run.model, nnx.Param))
        _same_params(from_pretrained(offline_cache["critic"]), nnx.state(run.critic.model, nnx.Param))
        _same_params(from_pretrained(offline_cache["reference"]), run.trainer.ref_params)
        stored = json.load(open(os.path.join(run.workdir, "config.json")))
        assert (stored["policy"]["path"], stored["critic"]["path"], stored["reference"]["path"]) == ids
        assert run.config.policy.path == ids[0]
    finally:
        run.checkpointer.close()
