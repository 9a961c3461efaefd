"""Paper setup: CAPO on Llama-3.2-1B-Instruct with a Qwen2.5-72B-Instruct GenPRM critic: configs/qwen2.5_1.5b.py's
setup (G = 16, M = 4, a v5e-32 slice, both models on all 32 chips) with a Llama instruct policy. Check the fit
before renting the slice:

python -m capo_jax.plan --config configs/llama3.2_1b.py
python -m capo_jax.train --config configs/llama3.2_1b.py \
    --config.policy.path=/ckpt/Llama-3.2-1B-Instruct --config.critic.path=/ckpt/Qwen2.5-72B-Instruct \
    --config.data.path=/data/math_train.jsonl
"""
import os

from capo_jax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2.5_1.5b.py"))
    c.workdir = "runs/llama3.2_1b_capo"
    c.policy.path = ""  # required: Llama-3.2-1B-Instruct Hugging Face folder
    c.policy.model_id = "meta-llama/Llama-3.2-1B-Instruct"
    c.data.use_chat_template = True  # an instruct model: the question goes in a user turn
    return c
