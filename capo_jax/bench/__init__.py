"""Benchmarks: `python -m capo_jax.bench {sampler,credit,train,load}`, each against a peer run side by side."""
