"""The embedded demo: CAPO on the synthetic arithmetic world, tiny policy bootstrapped from scratch, rule critic, CPU.

`python -m capo_jax.train --config configs/demo.py` bootstraps the policy on first use (cached by its
settings in the user cache folder), evaluates it, then trains it with step-level credit from the rule
critic, evaluating on held-out problems as it goes (docs/demo.md).
"""
from capo_jax.config import get_default_config


def get_config():
    c = get_default_config()
    c.workdir = "runs/demo"
    c.total_steps = 100
    c.policy.path = ""  # the demo policy, bootstrapped from demo.model / demo.sft on the world data.world
    c.data.source = "arithmetic"
    c.rollout.prompts_per_step = 8
    c.rollout.group_size = 8
    c.rollout.temperature = 1.0
    c.rollout.max_prompt_len = 32  # "Compute (((a op b) op c) op d) op e.\n" is about 20 tokens
    c.rollout.max_new_tokens = 48  # a 4-step solution is about 30 tokens
    c.critic.backend = "rule"
    c.critic.num_critiques = 4
    c.critic.misjudge_prob = 0.1  # a noisy judge, so the vote matters
    c.critic.vote = "intersection"
    c.reward.mode = "capo"
    c.reward.unstepped_tokens = "nearest"  # EOS shares its last step's penalty (else flagged groups reward stopping short)
    c.rl.micro_batch_size = 32
    c.rl.num_minibatches = 2
    c.rl.logprob_chunk = 48
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.optim.compute_dtype = "float32"
    c.checkpoint.every = 20
    c.eval.every = 10
    c.eval.num_problems = 128
    c.eval.samples = 4
    c.finish.export_hf = True  # runs/demo/hf_export: load with capo_jax.models.from_pretrained (or transformers + torch)
    c.finish.plot = True  # runs/demo/curves.png
    return c
