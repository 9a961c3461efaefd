"""Benchmarks: `python -m capo_jax.bench {sampler,credit,train}`, each against a peer run side by side."""
