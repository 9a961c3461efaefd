"""Run the PyTorch side of a benchmark in its own process.

A `Peer` keeps PyTorch's OpenMP pool, allocator and imports out of the process that times capo_jax
(and the other way round), while the benchmark still runs both in one command on the same weights.
Calls are `peer.call("module:function", *args)`; the function gets a per-process `state` dict first,
so objects such as a loaded model live in the child between calls.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import traceback
from typing import Any


def _serve(conn) -> None:
    state: dict[str, Any] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        target, args, kwargs = msg
        module, name = target.split(":")
        try:
            result = getattr(importlib.import_module(module), name)(state, *args, **kwargs)
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001 - the parent re-raises it with the child's traceback
            conn.send(("error", traceback.format_exc()))


class PeerError(RuntimeError):
    """A call in the peer process raised; the message carries its traceback."""


class Peer:
    """A spawned child process that runs `module:function(state, *args)` calls one at a time."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()

    def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        self._conn.send((target, args, kwargs))
        try:
            status, value = self._conn.recv()
        except EOFError as exc:
            raise PeerError(f"peer process died during {target} (exit code {self._proc.exitcode})") from exc
        if status != "ok":
            raise PeerError(f"{target} failed in the peer process:\n{value}")
        return value

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
