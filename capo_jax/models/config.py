"""ModelConfig: the hyperparameters of one Llama / Qwen2 / Qwen3 decoder, read from and written to HF config.json."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def canonical_dtype(dtype: Any) -> str:
    """Normalise a dtype given as a string, numpy or jax dtype (or HF's 'bf16'-style names) to its numpy name."""
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}
    if isinstance(dtype, str):
        dtype = aliases.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'") from e
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {name!r} is not a floating dtype for model weights: use 'float32' or 'bfloat16'")
    return name


def _eos(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyperparameters; frozen and hashable so it can be a static jit argument.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters.
    `rope_scaling` is None for plain RoPE or a dict with `rope_type` in {'linear', 'llama3'}.
    `attention_bias` puts biases on q/k/v; `attention_out_bias` also on o (Llama/Qwen3 `attention_bias=True`).
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    attention_out_bias: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype))
        object.__setattr__(self, "eos_token_id", _eos(self.eos_token_id))
        if self.rope_scaling is not None:
            # A frozen dataclass must hash: keep the dict but hash it through a sorted tuple (see __hash__).
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    def __hash__(self) -> int:
        fields = dataclasses.astuple(self)
        rs = tuple(sorted((k, str(v)) for k, v in (self.rope_scaling or {}).items()))
        return hash(tuple(f for f in fields if not isinstance(f, dict)) + rs)

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes or options are inconsistent."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported: use one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rt not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rt!r} is not supported: use one of {SUPPORTED_ROPE_TYPES}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict, **overrides: Any) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4 or 5 layout); `overrides` win."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type {model_type!r} is not supported: capo_jax loads {SUPPORTED_MODEL_TYPES}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act {act!r} is not supported: only 'silu' (SwiGLU) is implemented")
        if hf.get("mlp_bias", False):
            raise ValueError("config.json mlp_bias=true is not supported: capo_jax MLPs have no biases")
        if hf.get("use_sliding_window", False):
            raise ValueError("config.json use_sliding_window=true: sliding-window attention is not implemented; "
                             "set use_sliding_window to false (full attention) if that is acceptable")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types) and hf.get("use_sliding_window", False):
            raise ValueError(f"config.json layer_types {sorted(set(layer_types))}: only full attention is implemented")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("config.json partial_rotary_factor != 1 is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        lacking = [k for k in required if hf.get(k) is None]
        if lacking:
            raise ValueError(f"config.json lacks required field(s) {lacking}")
        theta, scaling = _read_rope(hf)
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        bias = bool(hf.get("attention_bias", False))
        kw = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bias,
            attention_out_bias=False if model_type == "qwen2" else bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """A transformers-5 config.json dict (also carries top-level rope_theta for older readers)."""
        rope = {"rope_theta": float(self.rope_theta), "rope_type": "default"}
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs["rope_type"] = rs.pop("type", rs.get("rope_type"))
            rope.update(rs)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": float(self.rope_theta),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.model_type == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
            if self.attention_out_bias or not self.attention_bias:
                raise ValueError("a qwen2 model has q/k/v biases and no o bias; this config cannot be written as qwen2")
        else:
            if self.attention_bias != self.attention_out_bias:
                raise ValueError(f"a {self.model_type} model has biases on all of q/k/v/o or none; "
                                 "this config cannot be written as that family")
            out["attention_bias"] = self.attention_bias
            if self.model_type == "qwen3":
                out.update(use_sliding_window=False, sliding_window=None)
                if not self.qk_norm:
                    raise ValueError("a qwen3 model always has q/k norms; set qk_norm=True")
            elif self.qk_norm:
                raise ValueError("a llama model has no q/k norms; use model_type='qwen3' for qk_norm=True")
            if self.model_type == "llama":
                out["mlp_bias"] = False
        return out


def _read_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either `rope_parameters` (transformers 5) or top-level fields (older)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and not any(isinstance(v, dict) for v in params.values()):
            params = dict(params, rope_theta=hf.get("rope_theta", 10000.0))
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError("config.json rope_parameters per layer type is not supported (one RoPE for all layers)")
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json rope type {rope_type!r} is not supported: use one of {SUPPORTED_ROPE_TYPES}")
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if scaling.get(key) is None:
                raise ValueError(f"config.json llama3 rope scaling lacks {key!r}")
    if rope_type == "linear" and scaling.get("factor") is None:
        raise ValueError("config.json linear rope scaling lacks 'factor'")
    return theta, dict(scaling, rope_type=rope_type)
