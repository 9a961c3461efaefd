"""The benchmark's peer process: state kept between calls, errors carried back with the child's traceback."""
import os

import pytest

from capo_jax.bench.peer import Peer, PeerError

HERE = __name__  # the child imports this module by the same name (spawn passes sys.path on)


def _remember(state, x):
    state["x"] = x
    return x * 2, os.getpid()


def _recall(state):
    return state["x"]


def _fail(state):
    raise ValueError("boom from the child")


def test_peer_keeps_state_runs_elsewhere_and_reports_errors():
    with Peer() as peer:
        doubled, pid = peer.call(f"{HERE}:_remember", 21)
        assert doubled == 42 and pid != os.getpid()
        assert peer.call(f"{HERE}:_recall") == 21
        with pytest.raises(PeerError, match="boom from the child"):
            peer.call(f"{HERE}:_fail")
        assert peer.call(f"{HERE}:_recall") == 21  # still serving after an error
