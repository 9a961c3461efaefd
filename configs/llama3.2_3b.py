"""Paper setup: CAPO on Llama-3.2-3B-Instruct with a Qwen2.5-72B-Instruct GenPRM critic: configs/llama3.2_1b.py
(G = 16, M = 4) on a v5p-32 slice (16 chips of 95 GiB), the slice the planner found for the 3B policy's rollout
cache at 512 x 3.5k tokens beside a 72B critic (docs/tpu.md). Both models on all 16 chips: the policy with FSDP over
every chip, the critic tensor parallel over every chip (its 8 KV heads repeated to 16). Check the fit before renting
the slice:

python -m capo_jax.plan --config configs/llama3.2_3b.py
python -m capo_jax.train --config configs/llama3.2_3b.py \
    --config.policy.path=/ckpt/Llama-3.2-3B-Instruct --config.critic.path=/ckpt/Qwen2.5-72B-Instruct \
    --config.data.path=/data/math_train.jsonl
"""
import os

from capo_jax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3.2_1b.py"))
    c.workdir = "runs/llama3.2_3b_capo"
    c.policy.path = ""  # required: Llama-3.2-3B-Instruct Hugging Face folder
    c.policy.model_id = "meta-llama/Llama-3.2-3B-Instruct"
    c.mesh.topology = "v5p-32"
    c.critic.batch_size = 16  # responses per critic call (x M rows)
    c.rl.micro_batch_size = 16  # one sequence per chip per micro-step
    return c
