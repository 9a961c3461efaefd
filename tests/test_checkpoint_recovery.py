"""Checkpoints fail safe: a damaged one is reported in one line, resume falls back to the newest good one and moves
the broken one aside (never deletes it); export and evaluate name it and exit 2 when it was asked for explicitly.

Real checkpoints of a tiny policy written by the real Checkpointer, then damaged the ways a crash or a full disk
damages them: a truncated array file, an empty meta/metadata, a missing item directory.
"""
import glob
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from capo_jax import checkpoint as ckpt_lib
from capo_jax import export as export_mod
from capo_jax.config import get_default_config

STEPS = (1, 2, 3)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _truncate_arrays(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _empty_meta(step_dir):
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()


def _missing_params(step_dir):
    shutil.rmtree(os.path.join(step_dir, "params"))


DAMAGE = {"truncated": _truncate_arrays, "empty_meta": _empty_meta, "missing_dir": _missing_params}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A workdir with checkpoints 1, 2, 3 of a tiny policy, each with its own weights (step s: init + s)."""
    from capo_jax.data.tokenizer import save_tokenizer
    from capo_jax.demo.bootstrap import _model_config
    from capo_jax.models import Transformer, save_pretrained

    root = tmp_path_factory.mktemp("recovery")
    hf = str(root / "hf")
    tok = save_tokenizer(hf)
    cfg = _model_config({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_layers": 1,
                         "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 64, "rope_theta": 1e4}, tok)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    save_pretrained(model, hf)
    work = str(root / "work")
    ckpt_lib.save_run_files(work, get_default_config().to_dict(), hf, model.config.to_hf())
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ck = ckpt_lib.Checkpointer(work, keep=5, async_save=False)
    for s in STEPS:
        p = jax.tree.map(lambda x: jnp.asarray(x) + s, base)
        ck.save(s, p, optax.adam(1e-3).init(p), {"step": s})
    ck.close()
    return work, base


@pytest.fixture
def workdir(pristine, tmp_path):
    work, base = pristine
    copy = str(tmp_path / "work")
    shutil.copytree(work, copy)
    return copy, base


def _like(base):
    p = jax.tree.map(jnp.asarray, base)
    return p, optax.adam(1e-3).init(p)


def _assert_weights_of(params, base, step):
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b) + step)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_good_checkpoint_and_moves_the_broken_one_aside(workdir, damage):
    work, base = workdir
    ckdir = os.path.join(work, ckpt_lib.CHECKPOINT_DIR)
    DAMAGE[damage](os.path.join(ckdir, "3"))
    files_before = sorted(os.path.relpath(f, os.path.join(ckdir, "3"))
                          for f in glob.glob(os.path.join(ckdir, "3", "**"), recursive=True))
    lines = []
    ck = ckpt_lib.Checkpointer(work, keep=5, async_save=False)
    got = ck.restore_newest(*_like(base), log=lines.append)
    assert got["step"] == 2 and got["meta"] == {"step": 2}
    _assert_weights_of(got["params"], base, 2)
    assert ck.all_steps() == [1, 2]
    # one line for the broken checkpoint (step, path, reason, where it went), one for the fallback
    assert len(lines) == 2 and all("\n" not in line and len(line) < 600 for line in lines), lines
    assert f"checkpoint step 3 at {os.path.join(ckdir, '3')} does not restore: " in lines[0]
    assert "moved aside to " in lines[0] and "falling back to step 2" in lines[1]
    # moved, not deleted: every file is still there, outside orbax's step listing
    (moved,) = glob.glob(os.path.join(ckdir, ckpt_lib.BROKEN_PREFIX + "3-*"))
    assert lines[0].endswith(moved)
    assert sorted(os.path.relpath(f, moved) for f in glob.glob(os.path.join(moved, "**"), recursive=True)) == files_before
    ck.close()
    # a fresh manager lists only the good ones, and step 3 can be written again over the gap
    again = ckpt_lib.Checkpointer(work, keep=5, async_save=False)
    assert again.all_steps() == [1, 2]
    p, o = _like(base)
    again.save(3, jax.tree.map(lambda x: x + 30, p), o, {"step": 3})
    again.wait()
    _assert_weights_of(again.restore(3, *_like(base))["params"], base, 30)
    again.close()


def test_the_reason_is_one_line_without_the_tensorstore_dump(workdir):
    work, base = workdir
    _truncate_arrays(os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "3"))
    ck = ckpt_lib.Checkpointer(work, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ck.restore(3, *_like(base))
    ck.close()
    msg = str(info.value)
    assert "\n" not in msg and "tensorstore_spec" not in msg and len(msg) < 600, msg
    assert info.value.step == 3 and msg.startswith("checkpoint step 3 at ")


def test_nothing_is_moved_when_no_checkpoint_restores(workdir):
    """Every checkpoint failing points at a changed config more than at corruption: raise, move nothing."""
    work, base = workdir
    wrong = jax.tree.map(lambda x: jnp.zeros(x.shape + (2,), x.dtype), base)  # another model's shapes
    ck = ckpt_lib.Checkpointer(work, keep=5, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint step 3 at .* does not restore: .*nor do steps 2, 1.*new workdir"):
        ck.restore_newest(wrong, None, log=print)
    assert ck.all_steps() == list(STEPS)
    assert not glob.glob(os.path.join(work, ckpt_lib.CHECKPOINT_DIR, ckpt_lib.BROKEN_PREFIX + "*"))
    ck.close()


def test_load_policy_reports_falls_back_and_moves_nothing(workdir):
    work, base = workdir
    _empty_meta(os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "3"))
    lines = []
    model, step = ckpt_lib.load_policy(work, log=lines.append)
    assert step == 2
    _assert_weights_of(nnx.to_pure_dict(nnx.state(model, nnx.Param)), base, 2)
    assert len(lines) == 2 and "checkpoint step 3 at " in lines[0] and "JSONDecodeError" in lines[0]
    assert "moved aside" not in lines[0]
    assert ckpt_lib.Checkpointer(work).all_steps() == list(STEPS)  # a reader leaves the workdir as it was


def test_export_of_an_explicit_broken_step_fails_in_one_line(workdir, tmp_path, capsys):
    """Through the real command: stderr is the one line, no TensorStore dump and no late-callback tracebacks."""
    work, _ = workdir
    _truncate_arrays(os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "3"))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "capo_jax.export", "--workdir", work, "--out", str(tmp_path / "o"),
                           "--step", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export: checkpoint step 3 at "), proc.stderr[-3000:]
    assert "Requested byte range" in lines[0] and not os.path.exists(tmp_path / "o")
    # without --step the export falls back to step 2 and says so
    assert export_mod.main(["--workdir", work, "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "falling back to step 2" in captured.err and "exported step 2" in captured.out


def test_evaluate_of_an_explicit_broken_step_fails_in_one_line(workdir, capsys):
    from capo_jax import evaluate

    work, _ = workdir
    _missing_params(os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "3"))
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--model", work, "--step", "3", "--benchmarks", "gsm8k", "--output", ""])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluate: checkpoint step 3 at ") and "params" in err, err


def test_unretrieved_reads_of_a_failed_restore_print_no_traceback(workdir, caplog):
    """A failed restore leaves orbax's other reads unawaited; when they are collected asyncio would log each with a
    traceback (seen in a resume after kill -9). Those reports are dropped, and only for the checkpoint that failed."""
    import asyncio

    work, base = workdir
    _truncate_arrays(os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "3"))
    ck = ckpt_lib.Checkpointer(work, keep=5, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError):
        ck.restore(3, *_like(base))
    ck.close()
    broken = os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "3", "params", "d", "abc")
    other = os.path.join(work, ckpt_lib.CHECKPOINT_DIR, "2", "params", "d", "abc")
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            for message in ("Future exception was never retrieved", "Task exception was never retrieved"):
                for path in (broken, other):  # what asyncio's default handler logs when such a future is collected
                    err = ValueError(f'OUT_OF_RANGE: Error reading local file "{path}": byte range not valid')
                    loop.call_exception_handler({"message": message, "exception": err})
            loop.call_exception_handler({"message": "Task was destroyed but it is pending!"})
    finally:
        loop.close()
    logged = [r.getMessage() + str(r.exc_info[1] if r.exc_info else "") for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 3, logged  # the two about step 2 and the unrelated one reach the log
    assert not any(broken in line for line in logged) and sum(other in line for line in logged) == 2
