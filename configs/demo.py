"""The embedded demo: CAPO on the synthetic arithmetic world, tiny policy bootstrapped from scratch, rule critic, CPU.

`python -m capo_jax.train --config configs/demo.py` bootstraps the policy (capo_jax.demo) into
the workdir on first run, then trains it with step-level credit from the rule critic.
"""
from capo_jax.config import get_default_config


def get_config():
    c = get_default_config()
    c.workdir = "runs/demo"
    c.total_steps = 60
    c.policy.path = ""  # bootstrapped into <workdir>/bootstrap from demo.model / demo.sft
    c.data.source = "arithmetic"
    c.rollout.prompts_per_step = 8
    c.rollout.group_size = 8
    c.rollout.temperature = 0.7  # measured here: at 1.0 the weak bootstrap (T=1 accuracy ~6%) drifts to shorter answers
    c.rollout.max_prompt_len = 48  # "Compute ((a op b) op c) op d.\n" is under 40 characters
    c.rollout.max_new_tokens = 96  # a 3-step solution is about 60 characters
    c.critic.backend = "rule"
    c.critic.num_critiques = 4
    c.critic.misjudge_prob = 0.1  # a noisy judge, so the vote matters
    c.critic.vote = "intersection"
    c.reward.mode = "capo"
    c.reward.unstepped_tokens = "nearest"  # EOS shares its last step's penalty (else flagged groups reward stopping short)
    c.rl.micro_batch_size = 32
    c.rl.num_minibatches = 2
    c.rl.logprob_chunk = 32
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.optim.compute_dtype = "float32"
    c.checkpoint.every = 20
    c.eval.every = 20
    c.eval.num_problems = 64
    c.finish.export_hf = True  # runs/demo/hf_export loads with transformers' AutoModelForCausalLM
    c.finish.plot = True  # runs/demo/curves.png
    return c
