"""What a user meets at the command line: no "PyTorch was not found" notice from our entry points (other transformers
messages still show); `train --help` with every config section and two examples; `train` alone pointing to the demo;
`bench --help` listing the sub-benchmarks; each sub-benchmark's help naming its real command."""
import os
import subprocess
import sys

import pytest

from capo_jax.bench.__main__ import BENCHES

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


# ---------------------------------------------------------------------------------------------
# Help


def test_train_help_lists_every_config_section_and_two_examples(capsys):
    import ml_collections

    from capo_jax import train
    from capo_jax.config import SECTION_HELP, get_default_config

    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    schema = get_default_config()
    sections = [k for k, v in schema.items() if isinstance(v, ml_collections.ConfigDict)]
    assert set(SECTION_HELP) == set(sections)  # one line per section, no stale ones
    lines = text.splitlines()
    for name in sections:
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(SECTION_HELP[name]) for line in lines), name
    for key in ("seed", "total_steps", "workdir"):
        assert key in text
    assert "--config configs/demo.py" in text and "--config configs/qwen2.5_1.5b.py" in text
    assert "--config.policy.path=" in text and "--config.critic.path=" in text


def test_train_without_a_config_prints_the_help_and_points_to_the_demo(capsys):
    from capo_jax import train

    assert train.main([]) == 2
    err = capsys.readouterr().err
    assert "config sections" in err and err.rstrip().endswith("python -m capo_jax.train --config configs/demo.py")
    # overrides without a config file: the schema's (paper) defaults, and a config error says how to get the demo
    assert train.main(["--workdir", "/nonexistent/capo_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("config error: ") and "--config configs/demo.py" in err


def test_bench_help_lists_each_benchmark_with_its_line(capsys):
    import importlib

    from capo_jax.bench.__main__ import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in BENCHES:
        doc = importlib.import_module(f"capo_jax.bench.{name}").__doc__.strip().splitlines()[0]
        assert f"  {name} " in text and doc in text, name
    assert main([]) == 2 and "NAME is one of" in capsys.readouterr().err
    assert main(["nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", BENCHES)
def test_bench_sub_help_names_the_real_command(name, capsys):
    from capo_jax.bench.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m capo_jax.bench {name} ")
