"""One writer per workdir: `workdir/.lock` names the trainer that owns it (host, pid, start time, command).

A second trainer on the same workdir stops with `WorkdirBusy` naming the owner; a lock left by a
trainer that no longer runs on this host (killed, crashed) is taken over with a warning. The lock
file is created with `os.link` of a finished temp file, so it is never seen half written (where the file
system has no hard links, with an exclusive create). A stale lock is removed only by the one process that
creates its takeover claim and finds the same file still there, so two contenders never both own it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Callable

LOCK_FILE = ".lock"
WRITE_GRACE_S = 10.0  # an unreadable lock younger than this may still be being written: wait, do not take it over
RACE_S = 60.0  # how long `acquire` keeps racing other processes for the lock before it gives up


class WorkdirBusy(RuntimeError):
    """Another live trainer owns the workdir; the message names it and how to proceed."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None off Linux or when gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid from the owner."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` runs on this host (a zombie does not; with `start`, it must be the same process)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except (OverflowError, ValueError):
        return False
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":
        return False
    now = _proc_start(pid)
    return start is None or now is None or now == start


def owner_line(info: dict[str, Any]) -> str:
    """`host H, pid P, started T (command: C)` for messages."""
    command = str(info.get("command", "?"))
    command = command if len(command) <= 120 else command[:117] + "..."
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')} (command: {command})"


class WorkdirLock:
    """The lock of one workdir held by this process; `release()` removes it (only if it is still ours)."""

    def __init__(self, path: str, info: dict[str, Any]) -> None:
        self.path, self.info = path, info

    def held(self) -> bool:
        """Whether the lock file on disk is still this one."""
        return _read(self.path) == self.info

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent)."""
        if self.held():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _snapshot(path: str) -> tuple[dict[str, Any] | None, str, float] | None:
    """(the lock's owner or None when unreadable, the identity of this very file, its age in seconds); None when
    there is no lock. The identity (inode, mtime, content hash) tells a stale lock from one written after it."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        owner = None
    identity = hashlib.sha256(f"{stat.st_ino}:{stat.st_mtime_ns}:".encode() + data).hexdigest()[:16]
    return (owner if isinstance(owner, dict) else None), identity, time.time() - stat.st_mtime


def _link_new(path: str, info: dict[str, Any]) -> bool:
    """Create `path` holding `info` atomically; False when it already exists."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system (some FUSE mounts): an exclusive create instead (readers may
        # see it empty for a moment: `acquire` waits WRITE_GRACE_S before it calls an unreadable lock stale)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        return True
    finally:
        os.remove(tmp)


def claim_path(path: str, identity: str) -> str:
    """The file whose creation gives one process the right to remove the lock file of this `identity`."""
    return f"{path}.takeover-{identity}"


def _take_over(path: str, identity: str, info: dict[str, Any]) -> bool:
    """Remove the stale lock `path` if it is still the file of `identity`; True when this process removed it.

    Only the creator of the claim may remove that file, and it re-reads the lock under the claim: a contender whose
    view is older finds a different file there and leaves it. So a lock written after the stale one is never
    removed, and of two contenders at most one removes the stale one (then both race for the link again)."""
    claim = claim_path(path, identity)
    if not _link_new(claim, info):
        held = _snapshot(claim)
        if held is not None and held[2] > WRITE_GRACE_S:  # takeovers take milliseconds: its taker died mid-way
            raise WorkdirBusy(f"a takeover of the stale lock {path} was interrupted ({claim} is {held[2]:.0f} s old): "
                              f"if no trainer uses {os.path.dirname(path)}, delete both files and start again")
        return False
    try:
        now = _snapshot(path)
        if now is None or now[1] != identity:
            return False  # gone, or already replaced by a newer owner's lock
        os.remove(path)
        return True
    finally:
        os.remove(claim)


def acquire(workdir: str, *, log: Callable[[str], None] | None = None, command: str | None = None) -> WorkdirLock:
    """Take `workdir/.lock` for this process, or raise WorkdirBusy naming the live owner.

    The same process may take it again (a second Run in one interpreter); a stale lock (its pid is gone
    from this host, or its file stays unreadable for WRITE_GRACE_S) is taken over with a warning through `log`.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    pid = os.getpid()
    info = {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command if command is not None else " ".join([os.path.basename(sys.executable)] + sys.argv),
            "token": uuid.uuid4().hex}  # no two lock files are ever equal
    deadline = time.monotonic() + RACE_S
    while time.monotonic() < deadline:
        if _link_new(path, info):
            return WorkdirLock(path, info)
        snap = _snapshot(path)
        if snap is None:
            continue  # removed since the link failed: race for it again
        owner, identity, age = snap
        if owner is None and age < WRITE_GRACE_S:
            time.sleep(0.02)  # an exclusive create still being written (no hard links here): wait for its owner
            continue
        if owner is not None and owner.get("host") != info["host"]:
            raise WorkdirBusy(f"workdir {os.path.dirname(path)} is in use by a trainer on {owner_line(owner)}: wait for it "
                              f"to finish or stop it there, or pass another --workdir; if no trainer runs there any more, "
                              f"delete {path}")
        if owner is not None and owner.get("pid") != pid and pid_alive(owner.get("pid", -1), owner.get("pid_start")):
            raise WorkdirBusy(f"workdir {os.path.dirname(path)} is in use by a trainer on {owner_line(owner)}: wait for it "
                              f"to finish or stop it (kill {owner.get('pid')}), or pass another --workdir")
        # stale (dead pid on this host, or unreadable) or our own: remove it if still that file, then link again
        if not _take_over(path, identity, info):
            time.sleep(0.005)  # another process is taking it over, or it changed: look again
            continue
        if owner is None:
            log(f"[lock] {path} was unreadable: taking it over")
        elif owner.get("pid") != pid:
            log(f"[lock] taking over the stale lock {path} of a trainer that is no longer running ({owner_line(owner)})")
    raise WorkdirBusy(f"could not take {path}: other processes keep racing for it; check who else uses this workdir")
