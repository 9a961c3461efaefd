"""capo_jax.plan: compile capo_jax's real programs for a named TPU slice on any host and report memory, FLOPs,
collectives and time bounds per device (`python -m capo_jax.plan --config configs/X.py --topology v5e-16`)."""
