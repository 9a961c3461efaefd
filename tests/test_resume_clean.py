"""A clean resume through the real command: kill -9 mid-run, damage the newest checkpoint, run the same command again.

The second run reports the broken checkpoint in one line, moves it aside, falls back to the one before, takes over
the dead trainer's lock, drops the metrics rows logged after the restored step, and ends with every step in
metrics.jsonl exactly once (the rows up to the restored step byte for byte as first logged) and TensorBoard
showing the same values; the evaluation lines on screen carry the bootstrap's (step 0) numbers, read back.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from capo_jax import checkpoint as ckpt_lib
from capo_jax.metrics import read_jsonl

from test_metrics import tensorboard_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6


@pytest.fixture(scope="module")
def demo_policy(tmp_path_factory):
    """The demo's bootstrap at test size, built once and shared (the runs below point policy.path at it)."""
    from capo_jax.demo.bootstrap import bootstrap_policy

    model = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    return bootstrap_policy(str(tmp_path_factory.mktemp("demo_policy")), model=model,
                            sft={"steps": 20, "batch_size": 16, "num_eval": 0}, log=lambda m: None)


def _command(workdir, policy):
    return [sys.executable, "-m", "capo_jax.train", "--config", "configs/demo.py", f"--workdir={workdir}",
            f"--config.policy.path={policy}", f"--config.total_steps={TOTAL}", "--config.checkpoint.every=2",
            "--config.checkpoint.keep=5", "--config.checkpoint.async_save=false", "--config.rollout.prompts_per_step=2",
            "--config.rollout.group_size=4", "--config.rl.micro_batch_size=8", "--config.rl.num_minibatches=1",
            "--config.eval.every=4", "--config.eval.num_problems=4", "--config.finish.export_hf=false",
            "--config.finish.plot=false"]


def test_kill_9_then_rerun_logs_each_step_once(demo_policy, tmp_path):
    workdir = str(tmp_path / "w")
    cache = str(tmp_path / "xla_cache")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = _command(workdir, demo_policy)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # wait for step 5: checkpoints 2 and 4 are on disk, step 6's is not
        deadline = time.time() + 300
        while time.time() < deadline and not any(r["step"] >= 5 for r in _rows(workdir)):
            assert proc.poll() is None, "the first run ended early"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_lines = _lines(workdir)
    logged = max(r["step"] for r in _rows(workdir))
    steps = ckpt_lib.Checkpointer(workdir).all_steps()
    assert os.path.exists(os.path.join(workdir, ".lock"))  # kill -9 leaves the lock behind
    assert steps[-1] < logged, (steps, logged)  # rows after the newest checkpoint exist: the case under test
    broken, restored = steps[-1], steps[-2]
    for f in glob.glob(os.path.join(workdir, "checkpoints", str(broken), "params", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:  # and the newest checkpoint is damaged too
            fh.truncate(os.path.getsize(f) // 2)

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    out = again.stderr
    assert f"checkpoint step {broken} at {os.path.join(workdir, 'checkpoints', str(broken))} does not restore" in out
    assert f"falling back to step {restored}" in out and f"restored step {restored}" in out
    assert "taking over the stale lock" in out and f"pid {proc.pid}," in out
    assert "Traceback" not in out
    assert glob.glob(os.path.join(workdir, "checkpoints", f"{ckpt_lib.BROKEN_PREFIX}{broken}-*"))
    evals = [line for line in out.splitlines() if line.startswith(f"eval@{TOTAL} ")]
    assert evals and "(bootstrap " in evals[0]  # the eval's numbers on screen, the step-0 row read back as reference
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at the end

    rows = read_jsonl(workdir)
    assert [r["step"] for r in rows] == list(range(0, TOTAL + 1))  # each step exactly once (0: the bootstrap's eval)
    final_lines = _lines(workdir)
    n = restored + 1  # rows 0..restored
    assert [r["step"] for r in rows[:n]] == list(range(n))
    assert final_lines[:n] == first_lines[:n]  # up to the restored step: byte for byte as first logged
    tb = tensorboard_scalars(os.path.join(workdir, "tb"))
    for key in ("train/loss", "reward/outcome_accuracy", "eval/sampled_accuracy"):
        want = {r["step"]: [pytest.approx(r[key])] for r in rows if r.get(key) is not None}
        assert len(want) >= 2 and tb[key] == want, key


def _lines(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines(keepends=True)


def _rows(workdir):
    """The rows written so far (a line being written may be cut)."""
    out = []
    for line in _lines(workdir):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
