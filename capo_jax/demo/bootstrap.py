"""Bootstrap the demo's tiny policy: build the tokenizer, train from scratch on noisy solutions, save an HF folder."""
from __future__ import annotations

# The tiny policy's shape (config `demo.model`).
MODEL_DEFAULTS: dict = {
    "model_type": "llama",  # llama | qwen2 (the architecture family written to config.json)
    "hidden_size": 128,  # model width
    "intermediate_size": 384,  # MLP width
    "num_layers": 3,  # decoder layers
    "num_heads": 4,  # attention heads
    "num_kv_heads": 2,  # key/value heads (grouped-query attention)
    "max_position_embeddings": 256,  # longest prompt + response
    "rope_theta": 10000.0,  # rotary base
}

# The supervised bootstrap phase (config `demo.sft`).
SFT_DEFAULTS: dict = {
    "steps": 400,  # optimizer steps
    "batch_size": 32,  # sequences per step
    "learning_rate": 3e-3,  # AdamW peak learning rate (warmup then cosine decay)
    "warmup_steps": 40,  # linear warmup steps
    "weight_decay": 0.01,  # AdamW weight decay
    "noise_prob": 0.15,  # probability that a solution step's result is off (later steps carry the error)
    "noise_max": 2,  # a noisy result is off by 1..noise_max
    "num_eval": 64,  # held-out problems for the greedy accuracy printed at the end
    "seed": 0,  # init, data and noise seed
}
