"""capo_jax: CAPO (Credit Assignment Policy Optimization) for JAX.

GRPO with step-level credit from a generative process reward model (an LLM critic).
"""

__version__ = "0.1.0"
