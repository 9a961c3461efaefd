"""Export: a workdir's checkpoint becomes a Hugging Face folder that transformers loads with the same logits."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from capo_jax import checkpoint as ckpt_lib
from capo_jax import export as export_mod
from capo_jax.config import get_default_config
from capo_jax.models import forward, from_pretrained


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as training leaves it: config, policy_hf/, and a checkpoint of perturbed (trained-like) weights."""
    from tiny_hf import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("export")
    policy = str(make_tiny_checkpoint(root / "policy", "llama", hidden_size=32, intermediate_size=64))
    model = from_pretrained(policy)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (np.asarray(x) + 0.05 * r.standard_normal(x.shape)).astype(np.float32), params)
    work = str(root / "work")
    cfg = get_default_config()
    ckpt_lib.save_run_files(work, cfg.to_dict(), policy, model.config.to_hf())
    ck = ckpt_lib.Checkpointer(work, async_save=False)
    original = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for step, tree in ((3, original), (7, params)):
        p = jax.tree.map(jnp.asarray, tree)
        ck.save(step, p, optax.adam(1e-3).init(p), {"step": step})
    ck.close()
    return work, params


def test_export_loads_in_transformers_with_same_logits(workdir, tmp_path):
    import torch
    import transformers

    work, params = workdir
    out = str(tmp_path / "hf")
    assert export_mod.main(["--workdir", work, "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.asarray([tok("Compute (3 + 4) * 2.\n")["input_ids"]], np.int64)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    policy, step = ckpt_lib.load_policy(work)
    assert step == 7
    got = np.asarray(forward(policy, ids.astype(np.int32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the restored weights are the checkpoint's (the perturbed ones), not the original checkpoint's
    restored = nnx.to_pure_dict(nnx.state(policy, nnx.Param))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_says_how_to_load_the_folder_and_the_jax_way_works(workdir, tmp_path, capsys):
    work, params = workdir
    out = str(tmp_path / "hf")
    assert export_mod.main(["--workdir", work, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert f"capo_jax.models.from_pretrained({out!r})" in printed and "pip install torch==2.13.0" in printed
    loaded = from_pretrained(out)  # the first way the message names, no PyTorch involved
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param))), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_an_earlier_step_and_errors(workdir, tmp_path):
    work, _ = workdir
    model, step = ckpt_lib.load_policy(work, step=3)
    assert step == 3
    assert export_mod.main(["--workdir", work, "--out", str(tmp_path / "o"), "--step", "5"]) == 2  # no such step
    assert export_mod.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # not a workdir
