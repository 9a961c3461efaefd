"""Paper setup: CAPO on Qwen2.5-1.5B with a 72B-class instruct GenPRM critic (set the three paths).

python -m capo_jax.train --config configs/qwen2.5_1.5b.py \
    --config.policy.path=/ckpt/Qwen2.5-1.5B --config.critic.path=/ckpt/Qwen2.5-72B-Instruct \
    --config.data.path=/data/math_train.jsonl
"""
from capo_jax.config import get_default_config


def get_config():
    c = get_default_config()
    c.workdir = "runs/qwen2.5_1.5b_capo"
    c.total_steps = 500
    c.policy.path = ""  # required: Qwen2.5-1.5B Hugging Face folder
    c.data.source = "local"  # a json/jsonl/parquet file of question/answer records (or "hf" with a hub id)
    c.data.path = ""  # required: the training problems
    c.data.answer_format = "boxed"
    c.data.template = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every device
    c.rollout.prompts_per_step = 64
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 512
    c.rollout.max_new_tokens = 3072
    c.rollout.temperature = 1.0
    c.critic.backend = "genprm"
    c.critic.path = ""  # required: a 70B-class instruct model (the paper: e.g. Qwen2.5-72B-Instruct)
    c.critic.num_critiques = 4
    c.critic.vote = "intersection"  # the paper's best vote for 1B-1.5B policies
    c.critic.max_new_tokens = 2048
    c.critic.dtype = "bfloat16"
    c.reward.w_whole, c.reward.w_process = 2.0, 1.0
    c.rl.micro_batch_size = 16
    c.rl.num_minibatches = 4
    c.rl.logprob_chunk = 256
    c.rl.kl_coef = 0.0
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.compute_dtype = "bfloat16"
    c.checkpoint.every = 25
    return c
