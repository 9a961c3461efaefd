"""CAPO on Qwen2.5-1.5B with a Qwen2.5-7B-Instruct GenPRM critic: configs/qwen2.5_1.5b.py (G = 16, M = 4) for a
smaller budget, a v5e-16 slice. Both models on all 16 chips (libtpu compiles a v5e program only over the whole
slice): the policy with FSDP over every chip, the critic 4-way tensor parallel (its 28 heads and 4 KV heads split
evenly) and 4-way data parallel. Check the fit before renting the slice:

python -m capo_jax.plan --config configs/qwen2.5_1.5b_critic7b.py
python -m capo_jax.train --config configs/qwen2.5_1.5b_critic7b.py \
    --config.policy.path=/ckpt/Qwen2.5-1.5B --config.critic.path=/ckpt/Qwen2.5-7B-Instruct \
    --config.data.path=/data/math_train.jsonl
"""
import os

from capo_jax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2.5_1.5b.py"))
    c.workdir = "runs/qwen2.5_1.5b_critic7b_capo"
    c.mesh.topology = "v5e-16"
    c.critic.path = ""  # required: Qwen2.5-7B-Instruct Hugging Face folder
    c.critic.model_id = "Qwen/Qwen2.5-7B-Instruct"
    c.critic.mesh.data, c.critic.mesh.fsdp, c.critic.mesh.tensor = -1, 1, 4
    c.critic.batch_size = 16  # responses per critic call (x M rows)
    c.rl.micro_batch_size = 16  # one sequence per chip per micro-step
    return c
