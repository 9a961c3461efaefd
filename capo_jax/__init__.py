"""capo_jax: CAPO (Credit Assignment Policy Optimization) for JAX.

GRPO with step-level credit from a generative process reward model (an LLM critic).
"""
import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized scheduler lets the devices of one process reach a program's collectives in
# different orders, which deadlocks a train step whose mesh has both a data and an fsdp axis (the rendezvous times
# out and aborts the process). The flag reads only on CPU and must be set before jax starts its CPU backend;
# a value the user set is kept.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()
