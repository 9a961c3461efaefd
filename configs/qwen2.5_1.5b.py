"""Paper setup: CAPO on Qwen2.5-1.5B with a Qwen2.5-72B-Instruct GenPRM critic, G = 16, M = 4, on a v5e-32 slice.

Both models live on all 32 chips (libtpu compiles a v5e program only over the whole slice): the policy with FSDP
over every chip, the critic tensor parallel over every chip (its 8 KV heads repeated to 32). Check the fit and the
bounds before renting the slice:

python -m capo_jax.plan --config configs/qwen2.5_1.5b.py        # compiles for mesh.topology (needs libtpu only)
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
    c.policy.model_id = "Qwen/Qwen2.5-1.5B"
    c.data.source = "local"  # a json/jsonl/parquet file of question/answer records (or "hf" with a hub id)
    c.data.path = ""  # required: the training problems
    c.data.answer_format = "boxed"
    c.data.template = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    c.mesh.topology = "v5e-32"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # the policy: FSDP over every chip
    c.rollout.prompts_per_step = 32
    c.rollout.group_size = 16  # G
    c.rollout.max_prompt_len = 512
    c.rollout.max_new_tokens = 3072
    c.rollout.temperature = 1.0
    c.critic.backend = "genprm"
    c.critic.path = ""  # required: Qwen2.5-72B-Instruct Hugging Face folder
    c.critic.model_id = "Qwen/Qwen2.5-72B-Instruct"
    c.critic.devices = ""  # the policy's devices (every chip of the slice)
    c.critic.mesh.data, c.critic.mesh.fsdp, c.critic.mesh.tensor = 1, 1, -1  # tensor parallel over every chip
    c.critic.num_critiques = 4  # M
    c.critic.vote = "intersection"  # the paper's best vote for 1B-1.5B policies
    c.critic.batch_size = 4  # responses per critic call (x M rows): what the KV cache beside both models holds
    c.critic.max_prompt_tokens = 4096
    c.critic.max_new_tokens = 2048
    c.critic.dtype = "bfloat16"
    c.reward.w_whole, c.reward.w_process = 2.0, 1.0
    c.rl.micro_batch_size = 32  # one sequence per chip per micro-step
    c.rl.num_minibatches = 4
    c.rl.logprob_chunk = 256
    c.rl.kl_coef = 0.0
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.compute_dtype = "bfloat16"
    c.checkpoint.every = 25
    return c
