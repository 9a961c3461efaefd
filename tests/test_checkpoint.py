"""Checkpointer (save/restore onto shardings, keep-K, latest), RNG JSON round trip, and the metrics sinks."""
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capo_jax import checkpoint as ckpt_lib
from capo_jax import parallel
from capo_jax.metrics import MetricsWriter, PhaseTimer, read_jsonl


def test_save_restore_onto_shardings_and_keep_last_k(tmp_path):
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), sh), "b": jnp.ones(3)}
    opt = optax.adamw(1e-3).init(params)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, every=2, async_save=True)
    for step in (2, 4, 6):
        p = jax.tree.map(lambda x: x + step, params)
        ck.save(step, p, opt, {"step": step, "data_state": {"offset": step * 3}})
    ck.wait()
    assert ck.all_steps() == [4, 6] and ck.latest_step() == 6
    assert ck.should_save(4) and not ck.should_save(5)
    got = ck.restore(None, params, opt)
    assert got["meta"] == {"step": 6, "data_state": {"offset": 18}}
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.arange(64.0).reshape(8, 8) + 6)
    assert got["params"]["w"].sharding == sh
    assert jax.tree.structure(got["opt_state"]) == jax.tree.structure(opt)
    ck.close()
    # a new manager on the same workdir sees the same checkpoints (what a restarted run does)
    again = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    assert again.latest_step() == 6
    again.close()


def test_rng_key_json_round_trip():
    key = jax.random.fold_in(jax.random.key(42), 7)
    back = ckpt_lib.key_from_json(json.loads(json.dumps(ckpt_lib.key_to_json(key))))
    np.testing.assert_array_equal(np.asarray(jax.random.uniform(key, (4,))), np.asarray(jax.random.uniform(back, (4,))))


def test_metrics_writer_jsonl_tensorboard_and_plain_lines(tmp_path):
    stream = io.StringIO()  # not a tty: plain lines instead of a progress bar
    w = MetricsWriter(str(tmp_path), total_steps=10, stream=stream)
    w.write(1, {"reward/outcome_accuracy": 0.25, "train/loss": np.float32(1.5), "train/kl": float("nan"), "note": "text"})
    w.write(2, {"reward/outcome_accuracy": 0.5, "train/loss": 1.0})
    w.close()
    rows = read_jsonl(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] == 1.5 and rows[0]["train/kl"] is None and "note" not in rows[0]
    text = stream.getvalue()
    assert "step 1/10" in text and "acc=0.25" in text and "loss=1" in text
    events = os.listdir(os.path.join(tmp_path, "tb"))
    assert events and events[0].startswith("events.out.tfevents")


def test_phase_timer_sums_phases():
    t = PhaseTimer()
    with t("rollout"):
        sum(range(10000))
    with t("update"):
        pass
    m = t.metrics()
    assert set(m) == {"time/rollout", "time/update", "time/step"}
    assert math.isclose(m["time/step"], m["time/rollout"] + m["time/update"])
