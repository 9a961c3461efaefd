"""Tiny random Hugging Face checkpoints (transformers + torch, CPU, well under a second) for tests.

`make_tiny_checkpoint(folder, family="qwen2", **overrides)` saves a random `LlamaForCausalLM`,
`Qwen2ForCausalLM` or `Qwen3ForCausalLM` (safetensors + config.json) and, by default, a byte-level
tokenizer with ChatML special tokens, and returns the folder.
"""
from __future__ import annotations

import pathlib
from typing import Any

# The byte-level tokenizer's special tokens, after the 256 byte tokens (ids 256, 257, ...).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
TOKENIZER_VOCAB = 256 + len(SPECIAL_TOKENS)

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE = dict(
    vocab_size=272,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=258,
    pad_token_id=259,
    initializer_range=0.1,
)

# Family defaults exercise each family's distinguishing features.
_FAMILY = {
    # Llama-3.x: llama3 rope scaling and tied embeddings (as Llama-3.2-1B/3B).
    "llama": dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    # Qwen2/2.5: q/k/v biases; a single kv head here (multi-query attention).
    "qwen2": dict(num_key_value_heads=1, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # Qwen3: q/k RMSNorm and a head_dim that differs from hidden/heads.
    "qwen3": dict(head_dim=24, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
}


def hf_config(family: str = "qwen2", **overrides: Any):
    """The transformers config object of a tiny model of `family` (llama | qwen2 | qwen3)."""
    import transformers

    if family not in _FAMILY:
        raise ValueError(f"family {family!r}: use one of {sorted(_FAMILY)}")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    kw = {**_BASE, **_FAMILY[family], **overrides}
    return cls(**kw)


def make_tiny_model(family: str = "qwen2", *, seed: int = 0, **overrides: Any):
    """A random transformers CausalLM (float32, eval mode) of `family`, with biases randomised too."""
    import torch
    import transformers

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # HF inits these to 0/1: randomise so they are tested
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_tokenizer():
    """A byte-level BPE tokenizer (no merges: one token per byte) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars, key=_byte_of))}
    for j, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + j
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[3], chat_template=_CHAT_TEMPLATE)


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode inverse)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def make_tiny_checkpoint(folder: str | pathlib.Path, family: str = "qwen2", *, seed: int = 0,
                         tokenizer: bool = True, dtype: str = "float32", **overrides: Any) -> pathlib.Path:
    """Save a tiny random `family` checkpoint (+ tokenizer) to `folder` and return it.

    `overrides` are transformers config fields (`hidden_size=32`, `num_hidden_layers=3`, `vocab_size=300`,
    `tie_word_embeddings=False`, ...). `dtype='bfloat16'` stores bfloat16 weights.
    """
    import torch

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(family, seed=seed, **overrides)
    if tokenizer and model.config.vocab_size < TOKENIZER_VOCAB:
        raise ValueError(f"vocab_size {model.config.vocab_size} < {TOKENIZER_VOCAB} tokenizer entries: "
                         "raise vocab_size or pass tokenizer=False")
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    if tokenizer:
        make_tokenizer().save_pretrained(folder)
    return folder


def make_scripted_checkpoint(folder: str | pathlib.Path, answer: str, *, after: str = "\n") -> pathlib.Path:
    """Save a 1-layer llama (+ byte tokenizer) that, once the prompt ends with `after`, writes `answer` then
    <|im_end|>, whatever the rest of the prompt: a critic with a known reply for end-to-end tests.

    Attention and MLP write nothing (zero output projections), so each position's logits depend on its own token
    only: one-hot embeddings, and an lm_head row per transition of the chain `after` -> answer -> <|im_end|>.
    Each byte of `answer` must appear once (a one-token memory cannot tell repeats apart)."""
    import torch

    chain = [b for b in after.encode()[-1:]] + list(answer.encode()) + [SPECIAL_TOKENS.index("<|im_end|>") + 256]
    if len(set(chain[1:])) != len(chain) - 1 or chain[0] in chain[1:]:
        raise ValueError(f"every byte of {answer!r} (and the last byte of {after!r}) must differ: the model sees one token")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = 288  # one-hot embeddings need width >= vocab (272); 4 heads of an even size
    model = make_tiny_model("llama", hidden_size=width, intermediate_size=16, num_hidden_layers=1,
                            tie_word_embeddings=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight.copy_(torch.eye(model.config.vocab_size, width))
        head = torch.zeros(model.config.vocab_size, width)
        for a, b in zip(chain, chain[1:]):
            head[b, a] = 3.0  # the next token's logit is 3 * sqrt(width) (about 50) above every other
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def add_to_hub_cache(folder: str | pathlib.Path, cache: str | pathlib.Path, repo_id: str, *,
                     commit: str = "0123456789abcdef0123456789abcdef01234567", branch: str = "main") -> pathlib.Path:
    """Lay `folder`'s files out as huggingface_hub's cache does after a download of `repo_id`, and return the snapshot.

    `cache/models--owner--name/` gets `blobs/<sha256>` (the file contents), `snapshots/<commit>/<file>`
    (relative symlinks to the blobs) and `refs/<branch>` (the commit).
    """
    import hashlib
    import os

    storage = pathlib.Path(cache) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot, refs = storage / "blobs", storage / "snapshots" / commit, storage / "refs"
    for d in (blobs, snapshot, refs):
        d.mkdir(parents=True, exist_ok=True)
    for src in sorted(pathlib.Path(folder).iterdir()):
        if src.is_file():
            data = src.read_bytes()
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    (refs / branch).write_text(commit)
    return snapshot
