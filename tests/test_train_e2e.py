"""CAPO end to end on tiny random checkpoints over 8 simulated devices: rollout, verify, steps, critic, update, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from capo_jax import checkpoint as ckpt_lib
from capo_jax.config import get_default_config
from capo_jax.metrics import read_jsonl
from capo_jax.rl.loop import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the runs below compile the same programs (same shapes, mesh,
    options), so each program is compiled once, not once per Run; the subprocess shares it through the env."""
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                                   "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield cache
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_hf import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    policy = make_tiny_checkpoint(root / "policy", "qwen2", hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, num_key_value_heads=2)
    critic = make_tiny_checkpoint(root / "critic", "llama", seed=1, hidden_size=32, intermediate_size=64)
    return str(policy), str(critic)


def _config(workdir, policy, critic, **overrides):
    c = get_default_config()
    c.workdir = str(workdir)
    c.policy.path = policy
    c.critic.path = critic
    c.total_steps = 3
    c.rollout.prompts_per_step, c.rollout.group_size = 2, 4
    c.rollout.max_prompt_len, c.rollout.max_new_tokens = 64, 16
    c.rl.micro_batch_size, c.rl.logprob_chunk = 8, 8
    c.critic.num_critiques, c.critic.max_new_tokens, c.critic.max_prompt_tokens = 2, 8, 2048
    c.critic.dtype = "float32"
    c.reward.max_steps = 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    c.optim.learning_rate, c.optim.weight_decay = 1e-3, 0.0
    c.logging.tensorboard = True
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def _params(run):
    return jax.tree.map(np.asarray, run.trainer.params)


def test_one_step_genprm_critic_on_its_own_devices(checkpoints, tmp_path):
    policy, critic = checkpoints
    cfg = _config(tmp_path / "w", policy, critic, total_steps=1, **{"critic.devices": "last:4", "mesh.fsdp": 2})
    run = Run(cfg)
    assert run.train() == 1
    rows = read_jsonl(cfg.workdir)
    assert len(rows) == 1 and rows[0]["step"] == 1
    row = rows[0]
    assert row["critic/prompt_tokens"] > 0 and row["critic/generated_tokens"] > 0  # the GenPRM really ran
    assert 0.0 <= row["critic/parse_failure_rate"] <= 1.0  # a random critic mostly fails to parse: outcome-only then
    for key in ("reward/outcome_accuracy", "train/loss", "train/grad_norm", "time/rollout", "time/critic", "time/update",
                "throughput/policy_tokens_per_s", "steps/per_response", "advantage/mean", "train/entropy"):
        assert key in row and row[key] is not None, key
    devices = jax.devices()
    policy_devs = {d for x in jax.tree.leaves(run.trainer.params) for d in x.sharding.device_set}
    critic_devs = {d for x in jax.tree.leaves(nnx.state(run.critic.model)) for d in x.sharding.device_set}
    assert policy_devs == set(devices[:4]) and critic_devs == set(devices[4:])
    assert ckpt_lib.Checkpointer(cfg.workdir).latest_step() == 1


def test_three_steps_genprm_on_the_policy_mesh_and_no_recompiles(checkpoints, tmp_path):
    policy, critic = checkpoints
    cfg = _config(tmp_path / "w", policy, critic, **{"optim.weight_decay": 0.1})
    run = Run(cfg)
    before = _params(run)
    assert run.train() == 3
    rows = read_jsonl(cfg.workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["critic/prompt_tokens"] > 0 and r["train/skipped_updates"] == 0.0 for r in rows)
    critic_devs = {d for x in jax.tree.leaves(nnx.state(run.critic.model)) for d in x.sharding.device_set}
    assert critic_devs == set(jax.devices())  # the critic shares the policy's 8 devices
    # one compiled update, reused by steps 2 and 3
    (fn,) = run.trainer._jitted.values()
    assert fn._cache_size() == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_params(run))))
    assert os.path.exists(os.path.join(cfg.workdir, "tb")) and os.listdir(os.path.join(cfg.workdir, "tb"))
    stored = json.load(open(os.path.join(cfg.workdir, "config.json")))
    assert stored["rollout"]["group_size"] == 4


def test_resume_equals_uninterrupted(checkpoints, tmp_path):
    """4 steps straight vs 2 steps, stop, then the same command again: identical parameters and optimizer state."""
    policy, critic = checkpoints
    over = {"critic.backend": "rule", "critic.misjudge_prob": 0.3, "total_steps": 4, "checkpoint.every": 1,
            "checkpoint.keep": 2}
    straight = Run(_config(tmp_path / "a", policy, "", **over))
    initial = _params(straight)
    straight.train()
    rows = read_jsonl(str(tmp_path / "a"))
    assert all(r["critic/parse_failure_rate"] == 0.0 for r in rows)  # the rule critic always writes a verdict
    # the noisy critic flags steps at random: step penalties give non-zero advantages and real updates to resume
    assert all(r["reward/frac_tokens_penalized"] > 0 and r["train/grad_norm"] > 0 for r in rows)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(_params(straight))))
    first = Run(_config(tmp_path / "b", policy, "", stop_after_steps=2, **over))
    assert first.train() == 2
    again = Run(_config(tmp_path / "b", policy, "", **over))
    assert again.step == 2
    assert again.train() == 4
    for a, b in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(again))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(straight.trainer.opt_state), jax.tree.leaves(again.trainer.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ckpt_lib.Checkpointer(str(tmp_path / "b")).all_steps() == [3, 4]  # keep the last K=2
    la, lb = read_jsonl(str(tmp_path / "a")), read_jsonl(str(tmp_path / "b"))
    assert [r["train/loss"] for r in la] == [r["train/loss"] for r in lb]


def test_sigterm_checkpoints_and_exits_cleanly(checkpoints, compilation_cache, tmp_path):
    policy, _ = checkpoints
    workdir = tmp_path / "w"
    args = [sys.executable, "-m", "capo_jax.train", f"--config.workdir={workdir}", f"--config.policy.path={policy}",
            "--config.critic.backend=rule", "--config.total_steps=1000", "--config.checkpoint.every=1000",
            "--config.rollout.prompts_per_step=2", "--config.rollout.group_size=4", "--config.rollout.max_prompt_len=64",
            "--config.rollout.max_new_tokens=16", "--config.rl.logprob_chunk=8", "--config.rl.micro_batch_size=8",
            "--config.reward.max_steps=4", "--config.critic.num_critiques=2", "--config.logging.tensorboard=false",
            "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.optim.learning_rate=1e-3",
            "--config.optim.weight_decay=0.0", "--config.checkpoint.async_save=false"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not read_jsonl(str(workdir)):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        assert read_jsonl(str(workdir)), "no training step finished in time"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
    steps = ckpt_lib.Checkpointer(str(workdir)).all_steps()
    assert steps and steps[-1] == read_jsonl(str(workdir))[-1]["step"] < 1000
    model, step = ckpt_lib.load_policy(str(workdir))
    assert step == steps[-1] and model.config.hidden_size == 32


def test_nonfinite_updates_are_skipped_and_stop_the_run(checkpoints, tmp_path):
    """A NaN learning rate makes every update non-finite: each is skipped, and after max_bad_steps the run stops
    without writing a checkpoint."""
    from capo_jax.rl.loop import StopTraining

    policy, _ = checkpoints
    cfg = _config(tmp_path / "w", policy, "", total_steps=5, max_bad_steps=2,
                  **{"critic.backend": "rule", "optim.learning_rate": float("nan"), "checkpoint.every": 1})
    run = Run(cfg)
    before = _params(run)
    with pytest.raises(StopTraining, match="2 consecutive steps with non-finite updates"):
        run.train()
    assert run.step == 2
    assert ckpt_lib.Checkpointer(cfg.workdir).all_steps() == []
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(_params(run))):
        np.testing.assert_array_equal(a, b)
    assert [r["train/skipped_updates"] for r in read_jsonl(cfg.workdir)] == [1.0, 1.0]
