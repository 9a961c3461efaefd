"""The README stays true: its config reference lists every key of the schema, and its two commands are there."""
import os

from capo_jax.config import get_default_config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _keys(d, prefix=""):
    for k, v in d.items():
        if hasattr(v, "items"):
            yield from _keys(v, prefix + k + ".")
        else:
            yield prefix + k


def test_every_config_key_is_documented():
    text = open(README).read()
    missing = [k for k in _keys(get_default_config()) if f"`{k}`" not in text]
    assert not missing, f"README's configuration reference lacks {missing}: add a row for each"


def test_the_two_commands_and_ci_agree():
    text = open(README).read()
    assert "python -m capo_jax.train --config configs/demo.py" in text
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
    test_line = [line for line in ci.splitlines() if "pytest" in line][0].strip()
    assert test_line in text, "the README's test command and .ci/run differ"
