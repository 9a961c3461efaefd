"""Test set-up: 8 simulated CPU devices (set before jax loads), a private bootstrap cache, and the `slow` marker."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the demo's bootstrap cache: one per test session, never the user's ~/.cache/capo_jax
os.environ["CAPO_JAX_CACHE"] = tempfile.mkdtemp(prefix="capo_jax_test_cache_")

import capo_jax  # noqa: E402,F401  (its XLA:CPU workaround joins XLA_FLAGS before jax starts a backend)
import jax  # noqa: E402  (must come after the flags above)

jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from the default run (-m 'not slow')")
    # capo_jax.checkpoint silences these at run time once a restore has failed, but pytest resets the warning
    # filters after each test, and the garbage collector may drop orbax's unawaited reads during a later one
    from capo_jax.checkpoint import UNAWAITED_READ_WARNING

    config.addinivalue_line("filterwarnings", f"ignore:{UNAWAITED_READ_WARNING}:RuntimeWarning")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["CAPO_JAX_CACHE"], ignore_errors=True)
