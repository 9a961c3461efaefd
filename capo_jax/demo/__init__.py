"""The embedded demo: a tiny policy bootstrapped on the synthetic arithmetic world, then CAPO vs GRPO."""
