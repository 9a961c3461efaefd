"""Paper setup: CAPO on Llama-3.2-1B-Instruct with a 72B-class instruct GenPRM critic (set the three paths).

python -m capo_jax.train --config configs/llama3.2_1b.py \
    --config.policy.path=/ckpt/Llama-3.2-1B-Instruct --config.critic.path=/ckpt/Qwen2.5-72B-Instruct \
    --config.data.path=/data/math_train.jsonl
"""
from capo_jax.config import get_default_config


def get_config():
    c = get_default_config()
    c.workdir = "runs/llama3.2_1b_capo"
    c.total_steps = 500
    c.policy.path = ""  # required: Llama-3.2-1B-Instruct Hugging Face folder
    c.data.source = "local"  # a json/jsonl/parquet file of question/answer records (or "hf" with a hub id)
    c.data.path = ""  # required: the training problems
    c.data.answer_format = "boxed"
    c.data.use_chat_template = True  # an instruct model: the question goes in a user turn
    c.data.template = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.rollout.prompts_per_step = 64
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 512
    c.rollout.max_new_tokens = 3072
    c.critic.backend = "genprm"
    c.critic.path = ""  # required: a 70B-class instruct model (the paper: e.g. Qwen2.5-72B-Instruct)
    c.critic.num_critiques = 4
    c.critic.vote = "intersection"
    c.critic.max_new_tokens = 2048
    c.rl.micro_batch_size = 16
    c.rl.num_minibatches = 4
    c.rl.logprob_chunk = 256
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.compute_dtype = "bfloat16"
    c.checkpoint.every = 25
    return c
