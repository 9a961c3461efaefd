"""Two real processes (jax.distributed over loopback, gloo collectives, 2 CPU devices each) run the real entry points,
and match one process on 4 devices: `python -m capo_jax.train` on the demo world (rows split by host, a SIGTERM to one
process stopping both at one step, a resume, the export), a GenPRM critic on a device of each host, and
`python -m capo_jax.evaluate` splitting the items."""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny demo: 1-layer 32-wide policy bootstrapped for 20 steps (built once, by the first run, in the test cache)
TINY = ["--config", "configs/demo.py", "--config.demo.sft.steps=20", "--config.demo.model.hidden_size=32",
        "--config.demo.model.intermediate_size=64", "--config.demo.model.num_layers=1",
        "--config.rollout.prompts_per_step=4", "--config.rollout.group_size=4", "--config.rl.micro_batch_size=8",
        "--config.rl.num_minibatches=1", "--config.optim.warmup_steps=0", "--config.eval.num_problems=6",
        "--config.eval.samples=2", "--config.finish.plot=False", "--config.logging.progress=False",
        "--config.logging.tensorboard=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(processes: int, devices_per_process: int) -> dict[str, str]:
    """The environment of one job's processes on the CPU (each adds its JAX_PROCESS_ID): this environment without
    the parent's JAX/XLA/TPU settings, with a fresh coordinator port when there are several processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "TPU_"))}
    # no scheduler flag here: capo_jax sets its XLA:CPU workaround itself on import
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    return env


def _launch(module: str, args: list[str], processes: int, cwd: str, *, sigterm_when=None) -> list[str]:
    """Run `python -m module args` as `processes` processes sharing 4 CPU devices; return their outputs (asserting
    each exits 0). `sigterm_when`: a callable polled while they run; once true, process 1 (only) gets a SIGTERM."""
    env = _job_env(processes, 4 // processes)
    logs = [os.path.join(cwd, f"{module.rsplit('.', 1)[-1]}.{time.monotonic_ns()}.p{i}.log") for i in range(processes)]
    procs = []
    for i in range(processes):
        with open(logs[i], "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT,
                                          env={**env, **({"JAX_PROCESS_ID": str(i)} if processes > 1 else {})}))
    try:
        deadline = time.monotonic() + 240
        signalled = sigterm_when is None
        while any(p.poll() is None for p in procs):
            if not signalled and sigterm_when():
                procs[1].send_signal(signal.SIGTERM)
                signalled = True
            assert time.monotonic() < deadline, "the processes did not finish in 240 s"
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(f).read() for f in logs]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-4000:]
    return texts


def _rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _weights(folder: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


# what every logged step must agree on with the one-process run: the update's, and the means over every row
COMPARED = ("train/loss", "train/grad_norm", "train/pg_loss", "train/entropy", "advantage/std", "reward/mean",
            "reward/outcome_accuracy", "rollout/response_len", "rollout/truncated_frac", "steps/per_response",
            "critic/flagged_step_frac", "critic/agreement", "reward/frac_tokens_penalized")
EVAL = ("eval/sampled_accuracy", "eval/sampled_step_error_rate", "eval/greedy_accuracy", "eval/greedy_step_error_rate")


def test_two_processes_train_stop_together_resume_and_export_like_one(tmp_path):
    steps = ["--config.total_steps=4", "--config.checkpoint.every=100", "--config.eval.every=2",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]
    one = str(tmp_path / "one")
    (ref_log,) = _launch("capo_jax.train", TINY + steps + [f"--config.workdir={one}"], 1, str(tmp_path))

    two = str(tmp_path / "two")
    args = TINY + steps + [f"--config.workdir={two}"]
    # a SIGTERM to process 1 once step 1 is logged: both stop after the same step and save one checkpoint
    first = _launch("capo_jax.train", args, 2, str(tmp_path), sigterm_when=lambda: any(r["step"] >= 1 for r in _rows(two)
                                                                                      if "train/loss" in r))
    stopped = {int(line.split("checkpointing step ")[1].split()[0]) for log in first for line in log.splitlines()
               if "checkpointing step" in line}
    assert len(stopped) == 1, first  # both processes name the same step
    (at,) = stopped
    assert 1 <= at < 4
    assert "SIGTERM:" in first[1] and "SIGTERM (on another process)" in first[0]
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == [str(at)]  # one checkpoint, written once
    assert "samples prompts 0..1 of each step's 4" in first[0] and "samples prompts 2..3 of each step's 4" in first[1]
    assert "policy on 4 devices (2 per process: processes 0..1)" in first[0]

    second = _launch("capo_jax.train", args, 2, str(tmp_path))  # the same command on both: resume, finish, export
    for log in second:
        assert f"restored step {at}" in log and "finished at step 4" in log
    assert "exported" in second[0] and "exported" not in second[1]  # process 0 writes (all gather the weights)

    ref, got = _rows(one), _rows(two)
    assert [r["step"] for r in got] == [r["step"] for r in ref]  # each step once: only process 0 writes metrics
    assert [r["step"] for r in ref if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in ref if "eval/greedy_accuracy" in r] == [0, 2, 4]
    for a, b in zip(ref, got):
        for key in COMPARED + EVAL:
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    assert all(r["train/grad_norm"] > 1e-3 for r in ref if "train/loss" in r)  # the comparison is not of zeros
    assert len({r["rollout/response_len"] for r in ref if "train/loss" in r}) > 1
    want, have = _weights(os.path.join(one, "hf_export")), _weights(os.path.join(two, "hf_export"))
    assert sorted(want) == sorted(have)
    for name in want:
        np.testing.assert_allclose(have[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    bootstrap = re.search(r"(?:reusing the cached bootstrap|cached as) (\S+)", ref_log).group(1)
    start = _weights(bootstrap)
    assert any(not np.array_equal(start[k], have[k]) for k in have)  # training moved the weights


def test_genprm_critic_on_a_device_of_each_host_reaches_the_credits(tmp_path):
    from tiny_hf import make_scripted_checkpoint

    # a critic that always answers that step 1 (0-based) is wrong: every valid vote flags it
    critic = make_scripted_checkpoint(tmp_path / "critic", "wrongSTEPlist:[1]")
    args = TINY + [f"--config.workdir={tmp_path / 'w'}", "--config.total_steps=1", "--config.eval.every=0",
                   "--config.finish.export_hf=False", "--config.critic.backend=genprm", f"--config.critic.path={critic}",
                   "--config.critic.devices=last:1", "--config.critic.num_critiques=2",
                   "--config.critic.max_new_tokens=24", "--config.mesh.data=1", "--config.mesh.fsdp=2"]
    logs = _launch("capo_jax.train", args, 2, str(tmp_path))
    assert "policy on 2 devices (1 per process: processes 0..1), critic on 2 devices (1 per process: processes 0..1)" \
        in logs[0]
    (row,) = _rows(str(tmp_path / "w"))
    assert row["critic/parse_failure_rate"] == 0.0 and row["critic/no_valid_critique_frac"] == 0.0
    assert row["critic/valid_critiques"] == 2.0
    rows = 16  # 4 prompts x 4 samples, both processes' rows: each critique is the 17 bytes and the end of turn
    assert row["critic/generated_tokens"] == rows * 2 * 18
    # a response with a second step has it flagged by both votes, the rest none: the penalty reaches the tokens
    assert 0.0 < row["critic/flagged_step_frac"] < 1.0 and row["critic/agreement"] == 1.0
    assert row["reward/frac_tokens_penalized"] > 0.0


def test_two_processes_evaluate_their_shares_into_one_report(tmp_path):
    from tiny_hf import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m", "qwen2", hidden_size=32, intermediate_size=64)
    reports = []
    for processes in (1, 2):
        out = str(tmp_path / f"eval{processes}.json")
        logs = _launch("capo_jax.evaluate", ["--model", str(model), "--benchmarks", "arithmetic", "--limit", "7",
                                             "--num_samples", "2", "--max_new_tokens", "12", "--batch_size", "2",
                                             "--save_responses", "--output", out], processes, str(tmp_path))
        reports.append(json.load(open(out)))
        for r in reports[-1]["results"].values():
            r.pop("seconds")
    assert "scored items 0..2 of 7" in logs[0] and "scored items 3..6 of 7" in logs[1]
    assert "wrote" in logs[0] and "wrote" not in logs[1]
    one, two = reports
    assert two["results"] == one["results"]
    assert two["responses"] == one["responses"]  # the same texts: keys follow each item's index, not its process
    assert len({s for item in one["responses"]["arithmetic"] for s in item["samples"]}) > 7  # varied random texts


RESTORE_WORKER = '''
import json, sys
import jax, numpy as np, optax
from jax.sharding import Mesh
from capo_jax.distributed import initialize
initialize("on")
from capo_jax import checkpoint as ckpt_lib
from capo_jax.multihost import replicated

mesh = Mesh(np.array(jax.devices()), ("data",))
like = {"w": replicated(mesh, np.zeros(6, np.float32))}
opt_like = jax.tree.map(lambda x: replicated(mesh, np.asarray(x)), optax.adam(1e-3).init({"w": np.zeros(6, np.float32)}))
ck = ckpt_lib.Checkpointer(sys.argv[1], keep=5, async_save=False)
for step in (1, 2):
    ck.save(step, {"w": replicated(mesh, np.full(6, step, np.float32))}, opt_like, {"step": step})
ck.wait()

def check(items):  # process 1 alone cannot use step 2 (as when its view of the file system lags)
    if jax.process_index() == 1 and items["meta"]["step"] == 2:
        raise ValueError("unreadable here")

lines = []
got = ck.restore_newest(like, opt_like, check=check, log=lines.append)
ck.close()
print("RESULT " + json.dumps({"step": got["step"], "w": np.asarray(got["params"]["w"].addressable_data(0)).tolist(),
                              "lines": lines}))
'''


def test_processes_resume_from_the_step_that_restores_on_all_of_them(tmp_path):
    """A checkpoint that restores on process 0 but not on process 1 counts as broken on both: they resume from the
    same older step (each going on from its own would hang the next collective), and process 0 moves it aside."""
    script = tmp_path / "restore_worker.py"
    script.write_text(RESTORE_WORKER)
    work = str(tmp_path / "w")
    env = _job_env(2, 1)
    procs = [subprocess.Popen([sys.executable, str(script), work], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line[len("RESULT "):]))
    assert [r["step"] for r in results] == [1, 1] and [r["w"] for r in results] == [[1.0] * 6] * 2
    lead, other = (r["lines"] for r in results)
    assert "checkpoint step 2 at " in lead[0] and "on process 1: ValueError: unreadable here" in lead[0]
    assert "moved aside to " in lead[0] and "falling back to step 1" in lead[1]
    assert "ValueError: unreadable here" in other[0] and "moved aside" not in other[0]
    assert sorted(os.listdir(os.path.join(work, "checkpoints")))[0] == "1"
    assert any(name.startswith("broken-2-") for name in os.listdir(os.path.join(work, "checkpoints")))
