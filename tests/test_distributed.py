"""Joining a multi-process job off TPU: settings from the environment or the config, clear errors for half-set ones,
and a real 2-process job over loopback (gloo collectives) started the way `python -m capo_jax.train` starts it."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from capo_jax import distributed
from capo_jax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def calls(monkeypatch):
    """Record jax.distributed.initialize's arguments instead of joining a job; no TPU chips on the bus."""
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "_has_tpu_chips", lambda: False)
    return seen


ENV = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}


def test_environment_gives_all_three(calls):
    assert distributed.initialize("auto", env=ENV)
    assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=4, process_id=2)]


def test_config_keys_override_the_environment(calls):
    assert distributed.initialize("on", coordinator="10.0.0.2:99", num_processes=8, process_id=7, env=ENV)
    assert calls == [dict(coordinator_address="10.0.0.2:99", num_processes=8, process_id=7)]


def test_config_keys_alone(calls):
    assert distributed.initialize("auto", coordinator="localhost:5", num_processes=2, process_id=0, env={})
    assert calls == [dict(coordinator_address="localhost:5", num_processes=2, process_id=0)]


def test_nothing_given_auto_stays_single_process_and_off_never_joins(calls):
    assert not distributed.initialize("auto", env={})
    assert not distributed.initialize("off", env=ENV)
    assert calls == []


@pytest.mark.parametrize("env, missing", [
    ({"JAX_NUM_PROCESSES": "2"}, ["JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, ["JAX_PROCESS_ID"]),
])
def test_half_set_settings_name_what_is_missing(calls, env, missing):
    with pytest.raises(ConfigError) as err:
        distributed.initialize("auto", env=env)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in missing)
    assert all(name not in message for name in set(ENV) - set(missing))
    assert calls == []


@pytest.mark.parametrize("kwargs, env, words", [
    ({}, {**ENV, "JAX_PROCESS_ID": "4"}, "outside 0..3"),
    ({"process_id": 5}, ENV, "outside 0..3"),
    ({}, {**ENV, "JAX_NUM_PROCESSES": "two"}, "not an integer"),
    ({}, {**ENV, "JAX_NUM_PROCESSES": "0"}, ">= 1"),
    ({"coordinator": "127.0.0.1"}, ENV, "HOST:PORT"),
])
def test_bad_values_fail_with_one_line(calls, kwargs, env, words):
    with pytest.raises(ConfigError, match=words):
        distributed.initialize("on", env=env, **kwargs)
    assert calls == []


def test_cloud_tpu_lets_jax_read_the_tpu_metadata(calls):
    tpu = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
    assert distributed.initialize("auto", env=tpu)
    assert distributed.initialize("auto", env={**tpu, "JAX_PROCESS_ID": "3"})  # a partial setting is passed on
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None),
                     dict(coordinator_address=None, num_processes=None, process_id=3)]


def test_single_host_tpu_vm_stays_single_process(calls):
    assert not distributed.initialize("auto", env={"TPU_WORKER_HOSTNAMES": "w0"})
    assert calls == []


def test_on_without_any_cluster_says_what_to_set(monkeypatch):
    monkeypatch.setattr(distributed, "_has_tpu_chips", lambda: False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)

    def fail(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS .*JAX_NUM_PROCESSES .*JAX_PROCESS_ID"):
        distributed.initialize("on", env={})


def test_unknown_mode():
    with pytest.raises(ConfigError, match="distributed='yes'"):
        distributed.initialize("yes", env={})


# The worker runs what `python -m capo_jax.train` runs before building the Run: parse the command line,
# join the job. It first clears JAX's CPU collectives so that only our switch to gloo can make the sum work.
WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", None)
    from capo_jax.config import parse_args
    from capo_jax.train import initialize_distributed
    config, rest = parse_args(sys.argv[1:])
    assert not rest, rest
    joined = initialize_distributed(config)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("x",))
    pid = jax.process_index()
    local = np.array([10 * pid + 1, 10 * pid + 2], np.float32)  # this process's two rows
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps(dict(joined=joined, pid=pid, count=jax.process_count(), devices=jax.device_count(),
                          local_devices=jax.local_device_count(), total=float(total),
                          collectives=jax.config.jax_cpu_collectives_implementation)), flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_join_over_loopback_and_sum_across_them(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID="0")  # both read 0 from the environment: process 1 gets its id from the config key
    args = [[], ["--config.distributed_process_id=1"]]
    procs = [subprocess.Popen([sys.executable, str(script), *a], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(o["pid"] for o in outs) == [0, 1]
    for o in outs:
        assert o["joined"] and o["count"] == 2 and o["devices"] == 4 and o["local_devices"] == 2
        assert o["collectives"] == "gloo"
        assert o["total"] == 1 + 2 + 11 + 12  # both processes' rows
