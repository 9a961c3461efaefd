"""Analytic FLOPs and bytes of the programs, from the model's shapes alone: the yardstick the compiled programs'
HLO counts are compared with (ratios near 1 mean the compiler does the work the model needs and no more)."""
from __future__ import annotations

from capo_jax.models.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights one decoder layer multiplies per token (q, k, v, o, gate, up, down)."""
    e, h, kv, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return e * h * d * 2 + e * kv * d * 2 + 3 * e * m


def head_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


def causal_attention_flops(cfg: ModelConfig, length: int) -> float:
    """Score and value matmuls of causal attention over one sequence, all layers (query i sees i + 1 keys)."""
    return 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers * length * (length + 1) / 2


def forward_flops(cfg: ModelConfig, length: int, head_positions: int) -> tuple[float, float]:
    """(layers, head) FLOPs of one sequence's forward pass: `length` tokens through the layers, logits at
    `head_positions` of them."""
    layers = 2.0 * layer_matmul_params(cfg) * cfg.num_layers * length + causal_attention_flops(cfg, length)
    return layers, 2.0 * head_params(cfg) * head_positions


def train_step_flops(cfg: ModelConfig, *, rows: int, prompt_len: int, response_len: int, ppo_epochs: int,
                     remat: bool, logprob_remat: bool, recompute_old: bool, reference: bool) -> float:
    """Model FLOPs of one RL update over the whole batch (all devices): per epoch a forward and a backward (twice the
    forward) with the recomputations remat adds, plus the no-gradient passes for old and reference log-probs."""
    layers, head = forward_flops(cfg, prompt_len + response_len, response_len)
    grad = 3 * (layers + head) + (layers if remat else 0.0) + (head if logprob_remat else 0.0)
    once = (layers + head) * (int(recompute_old) + int(reference))
    return rows * (ppo_epochs * grad + once)


def decode_token_flops(cfg: ModelConfig, *, rows: int, cache_len: int) -> float:
    """FLOPs of one decode step for `rows` rows (all devices), attention over every slot of the cache."""
    per_row = 2.0 * (layer_matmul_params(cfg) * cfg.num_layers + head_params(cfg))
    per_row += 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers * cache_len
    return rows * per_row


def prefill_flops(cfg: ModelConfig, *, prompts: int, prompt_len: int) -> float:
    """FLOPs of the prefill (all devices): every prompt token through the layers, logits at the last one."""
    layers, head = forward_flops(cfg, prompt_len, 1)
    return prompts * (layers + head)
