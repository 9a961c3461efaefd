"""One writer per workdir: a live owner stops a second trainer (exit 2, naming host and pid), a stale lock is taken
over with a warning, and the lock goes away when the trainer ends, also on an exception."""
import json
import os
import socket
import subprocess
import sys

import pytest

from capo_jax import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
HOLDER = ("import sys; from capo_jax import lock; lock.acquire(sys.argv[1], command='holder'); "
          "print('ready', flush=True); sys.stdin.read()")  # exits without releasing: leaves a stale lock


def _owner(path):
    with open(path) as f:
        return json.load(f)


def _train(workdir, *extra):
    return subprocess.run([sys.executable, "-m", "capo_jax.train", "--config", "configs/demo.py", f"--workdir={workdir}",
                           *extra], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_live_owner_stops_a_second_trainer_and_a_dead_one_is_taken_over(tmp_path):
    workdir = str(tmp_path / "w")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        proc = _train(workdir)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        msg = proc.stderr.strip().splitlines()[-1]
        assert f"host {socket.gethostname()}, pid {holder.pid}," in msg and f"kill {holder.pid}" in msg, msg
        assert "--workdir" in msg and "command: holder" in msg
        assert sorted(os.listdir(workdir)) == [".lock"]  # the second trainer wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()
    # the holder is gone (reaped), its lock stays behind: the next owner takes it over and says so
    stale = _owner(os.path.join(workdir, ".lock"))
    assert stale["pid"] == holder.pid
    lines = []
    mine = lock.acquire(workdir, log=lines.append)
    assert len(lines) == 1 and "stale" in lines[0] and f"pid {holder.pid}," in lines[0]
    assert _owner(os.path.join(workdir, ".lock"))["pid"] == os.getpid()
    assert not [f for f in os.listdir(workdir) if f != ".lock"]  # no temp or stale files left behind
    mine.release()
    assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_the_lock_is_released_when_the_trainer_fails(tmp_path):
    workdir = str(tmp_path / "w")
    proc = _train(workdir, "--config.demo.model.model_type=gpt2")  # fails in the bootstrap, after taking the lock
    assert proc.returncode not in (0, 2) and "model_type must be llama or qwen2" in proc.stderr, proc.stderr[-3000:]
    assert os.path.isdir(workdir) and not os.path.exists(os.path.join(workdir, ".lock"))


def test_same_process_reuses_and_other_hosts_and_reused_pids(tmp_path):
    workdir = str(tmp_path)
    first = lock.acquire(workdir, log=pytest.fail)
    second = lock.acquire(workdir, log=pytest.fail)  # a second Run in one interpreter: no warning
    assert second.held()
    second.release()
    assert not os.path.exists(os.path.join(workdir, ".lock"))
    path = os.path.join(workdir, ".lock")
    with open(path, "w") as f:  # a trainer on another host: cannot be checked from here, so it is not taken over
        json.dump({"host": "elsewhere", "pid": 1, "started": "then", "command": "train"}, f)
    with pytest.raises(lock.WorkdirBusy, match=r"host elsewhere, pid 1, .*delete .*\.lock"):
        lock.acquire(workdir)
    # a live pid whose start time differs is a reused pid, not the owner: stale
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getppid(), "pid_start": "-1", "started": "then", "command": "x"}, f)
    lines = []
    lock.acquire(workdir, log=lines.append).release()
    assert "stale" in lines[0]
    assert lock.pid_alive(os.getpid()) and lock.pid_alive(os.getppid(), lock._proc_start(os.getppid()))


def test_without_hard_links_an_exclusive_create_still_guards(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    mine = lock.acquire(str(tmp_path))
    assert _owner(tmp_path / ".lock")["pid"] == os.getpid() and sorted(os.listdir(tmp_path)) == [".lock"]
    with open(tmp_path / ".lock", "w") as f:
        json.dump({"host": "elsewhere", "pid": 1}, f)
    with pytest.raises(lock.WorkdirBusy):
        lock.acquire(str(tmp_path))
    assert not mine.held()


CONTENDER = """
import os, sys, time
from capo_jax import lock
if sys.argv[3] == "nolink":  # a file system without hard links: the exclusive-create path
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    os.link = no_links
while not os.path.exists(sys.argv[2]):  # start together
    time.sleep(0.001)
try:
    lock.acquire(sys.argv[1], log=lambda m: None, command="contender")
    print("won", flush=True)
except lock.WorkdirBusy:
    print("busy", flush=True)
sys.stdin.read()  # hold the lock (alive) until every contender has decided
"""


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("links", ["link", "nolink"])
def test_of_contenders_for_a_stale_lock_exactly_one_wins(tmp_path, links):
    """Processes started together on a workdir whose lock a dead trainer left: one takes it over, the others find a
    live owner (with or without hard links)."""
    for round_ in range(3):
        workdir, go = str(tmp_path / f"w{round_}"), str(tmp_path / f"go{round_}")
        os.makedirs(workdir)
        with open(os.path.join(workdir, ".lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then", "command": "dead"}, f)
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, workdir, go, links], cwd=REPO, env=ENV,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
        try:
            open(go, "w").close()
            results = [p.stdout.readline().strip() for p in procs]
        finally:
            for p in procs:
                p.stdin.close()
                p.wait(timeout=60)
                p.stdout.close()
        assert sorted(results) == ["busy", "busy", "busy", "won"], results
        assert _owner(os.path.join(workdir, ".lock"))["pid"] in [p.pid for p in procs]
        assert sorted(os.listdir(workdir)) == [".lock"]  # no claim or temp file left


def test_a_lock_still_being_written_is_waited_for_not_taken_over(tmp_path, monkeypatch):
    """Without hard links the owner creates the lock empty and then writes it: a contender that reads it empty in
    between waits for the owner's content instead of calling it unreadable and taking it over."""
    import threading

    path = tmp_path / ".lock"
    path.write_text("")  # created, not yet written, by a live trainer (our parent process)
    owner = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now", "command": "writer"}
    writer = threading.Timer(0.3, lambda: path.write_text(json.dumps(owner)))
    writer.start()
    with pytest.raises(lock.WorkdirBusy, match=f"pid {os.getppid()},"):
        lock.acquire(str(tmp_path), log=pytest.fail)
    writer.join()
    # an empty lock old enough is a writer that died: taken over, with the warning
    path.write_text("")
    monkeypatch.setattr(lock, "WRITE_GRACE_S", 0.0)
    lines = []
    lock.acquire(str(tmp_path), log=lines.append).release()
    assert len(lines) == 1 and "unreadable" in lines[0]


def test_a_contender_with_an_old_view_never_removes_a_newer_lock(tmp_path):
    path = str(tmp_path / ".lock")
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then", "command": "dead"}, f)
    stale = lock._snapshot(path)[1]  # what a slower contender read
    mine = lock.acquire(str(tmp_path), log=lambda m: None)  # a faster one took it over meanwhile
    assert not lock._take_over(path, stale, {"pid": -1})  # the slow one's takeover finds another file: leaves it
    assert mine.held() and sorted(os.listdir(tmp_path)) == [".lock"]
    # a claim whose taker died mid-way (older than a takeover can take) is named, not waited on for ever
    mine.release()
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then", "command": "dead"}, f)
    claim = lock.claim_path(path, lock._snapshot(path)[1])
    open(claim, "w").close()
    os.utime(claim, (1, 1))
    with pytest.raises(lock.WorkdirBusy, match="takeover of the stale lock .* was interrupted .*delete both files"):
        lock.acquire(str(tmp_path))
