"""What a user meets at the command line: transformers' "PyTorch was not found" notice is silenced by our entry
points (other transformers messages still show)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TRANSFORMERS_NO_ADVISORY_WARNINGS="")
# a Python without PyTorch, as the documented install leaves it: find_spec("torch") says it is not there
HIDE_TORCH = ("import importlib.util as u; _f = u.find_spec; "
              "u.find_spec = lambda n, *a, **k: None if n == 'torch' or n.startswith('torch.') else _f(n, *a, **k)\n")
AFTER = ("import transformers, logging\n"
         "logging.getLogger('transformers').warning('a real transformers warning')\n")


def _stderr(body):
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH + body + AFTER], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_without_our_entry_point_transformers_prints_the_notice():
    err = _stderr("")
    assert "PyTorch was not found" in err and "a real transformers warning" in err


@pytest.mark.parametrize("module", ["train", "export", "evaluate"])
def test_our_entry_points_drop_only_the_notice(module):
    err = _stderr(f"from capo_jax import {module}\n"
                  f"try:\n    {module}.main(['--help'])\nexcept SystemExit:\n    pass\n")
    assert "PyTorch was not found" not in err and "a real transformers warning" in err
