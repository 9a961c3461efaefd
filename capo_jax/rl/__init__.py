"""The RL side of capo_jax: the PPO-clip loss (`losses`), the jitted sharded update (`train_step`), the loop (`loop`)."""
