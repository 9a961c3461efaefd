"""The Flax GenPRM critic: a frozen instruct LLM that writes M step critiques per response.

The model is loaded with `capo_jax.models.from_pretrained` and sharded by the critic's rules
(`mesh.critic_rules`, default the inference rules) on a mesh of its own (`critic.mesh`), over the
policy's devices or its own slice of them (`critic.devices`); KV heads that do not split evenly over
the tensor axis are repeated (`sampling.InferenceCopy`). Each request's prompt is prefilled once and
sampled M times (`SamplingParams(n=M)`); the texts go to the shared parser.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from capo_jax import multihost
from capo_jax.critic.base import CriticStats, CritiqueRequest
from capo_jax.critic.prompt import (DEFAULT_OUTCOME_TEMPLATE, DEFAULT_TEMPLATE, PromptTemplate, render_outcome_prompt,
                                    render_prompt)
from capo_jax.sampling import InferenceCopy, SamplingParams, generate

# Fields of the `critic` config section this backend reads (the config schema copies them).
DEFAULTS: dict[str, Any] = {
    "path": "",  # local folder of a Hugging Face instruct checkpoint with its tokenizer
    "dtype": "bfloat16",  # dtype of the critic's weights and activations (it is frozen)
    "max_prompt_tokens": 4096,  # rendered prompts longer than this are refused: [] critiques
    "max_new_tokens": 1024,  # length budget of one critique
    "temperature": 1.0,  # sampling temperature of the critiques (M samples should differ)
    "top_p": 1.0,  # nucleus sampling threshold (1.0 = off)
    "batch_size": 8,  # requests prefilled together per generate call (x M sampled rows)
    "devices": "",  # "" = the policy's devices; or device indices "0,1" / [0, 1] / "first:4" / "last:4" (per process)
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # the critic's own mesh over its devices (-1 fills)
    "index_base": 0,  # number of the first step in the rendered prompt and in the verdicts
    "template": "default",  # critic prompt template name: a key of genprm.TEMPLATES
}

# Prompt templates by config name: (step-critique template, outcome-judgement template).
TEMPLATES: dict[str, tuple[PromptTemplate, PromptTemplate]] = {
    "default": (DEFAULT_TEMPLATE, DEFAULT_OUTCOME_TEMPLATE),
}

# End-of-turn tokens of common chat formats; a critique stops at the first one in the vocabulary.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                       "<end_of_turn>", "</s>")


def select_devices(spec: Any, devices: Sequence[jax.Device] | None = None) -> list[jax.Device] | None:
    """The devices a `devices` option names: None for "" (share the policy's), else a list.

    Accepts a list of indices, a string of comma-separated indices, "first:N" or "last:N". When `devices` belong to
    several processes, the option picks within each process's own devices (indices count from each process's first
    device), so every host keeps devices of both roles and the critic's mesh spans every host, as the policy's does.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    processes: dict[int, list] = {}
    for d in devices:
        processes.setdefault(getattr(d, "process_index", 0), []).append(d)
    if len(processes) > 1:
        if len({len(v) for v in processes.values()}) > 1:
            raise ValueError(f"critic.devices={spec!r}: the processes have different numbers of devices")
        try:
            picked = [_select_one_process(spec, local) for local in processes.values()]
        except ValueError as exc:
            raise ValueError(f"{exc} (with {len(processes)} processes, it picks within each process's "
                             f"{len(next(iter(processes.values())))} devices)") from None
        return None if picked[0] is None else [d for p in picked for d in p]
    return _select_one_process(spec, devices)


def _select_one_process(spec: Any, devices: list) -> list | None:
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            where, _, count = text.partition(":")
            if where not in ("first", "last") or not count.strip().isdigit():
                raise ValueError(f"critic.devices={spec!r}: use 'first:N', 'last:N' or indices like '4,5,6,7'")
            n = int(count)
            if not 1 <= n <= len(devices):
                raise ValueError(f"critic.devices={spec!r}: N must be between 1 and {len(devices)} devices")
            return devices[:n] if where == "first" else devices[-n:]
        try:
            indices = [int(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise ValueError(f"critic.devices={spec!r}: use 'first:N', 'last:N' or indices like '4,5,6,7'") from err
    else:
        indices = [int(i) for i in spec]
    if not indices:
        return None
    bad = [i for i in indices if not 0 <= i < len(devices)]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f"critic.devices={spec!r}: indices must be distinct and in [0, {len(devices)})")
    return [devices[i] for i in indices]


def stop_token_ids(tokenizer: Any, model_dir: str | None = None) -> list[int]:
    """The ids that end a critique: the tokenizer's EOS, known end-of-turn tokens, and the
    `eos_token_id` of the folder's generation_config.json / config.json."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    if model_dir:
        for name in ("generation_config.json", "config.json"):
            file = os.path.join(model_dir, name)
            if os.path.exists(file):
                with open(file, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token_id")
                if isinstance(eos, int):
                    ids.add(eos)
                elif isinstance(eos, list):
                    ids.update(int(e) for e in eos)
    return sorted(ids)


def resolve_template(template: str | PromptTemplate) -> tuple[PromptTemplate, PromptTemplate]:
    """The (critique, outcome) templates a config name stands for; a PromptTemplate is used for critiques."""
    if isinstance(template, PromptTemplate):
        return template, DEFAULT_OUTCOME_TEMPLATE
    if template not in TEMPLATES:
        raise ValueError(f"critic.template={template!r} is unknown: use one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def check_settings(*, max_prompt_tokens: int, max_new_tokens: int, batch_size: int, temperature: float,
                   top_p: float) -> None:
    """Raise a ValueError naming the `critic.*` key when a generation setting is out of range."""
    for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"critic.{name}={value}: must be a positive integer")
    if not float(temperature) >= 0.0:
        raise ValueError(f"critic.temperature={temperature}: must be >= 0 (0 = greedy)")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"critic.top_p={top_p}: must be in (0, 1] (1 = off)")


def _cfg_get(cfg: Any, key: str) -> Any:
    """Read one field from a dict or ConfigDict section, falling back to DEFAULTS."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, DEFAULTS[key])
    return getattr(cfg, key, DEFAULTS[key])


def critic_mesh(critic_cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The critic's mesh: `critic_cfg.mesh` (data, fsdp, tensor; one may be -1) over the devices
    `critic_cfg.devices` names, or over `devices` (default: all of jax's) when it shares the policy's."""
    from capo_jax.parallel import mesh_from_config

    devices = list(jax.devices() if devices is None else devices)
    own = select_devices(_cfg_get(critic_cfg, "devices"), devices)
    shape = _cfg_get(critic_cfg, "mesh")
    shape = shape.to_dict() if hasattr(shape, "to_dict") else dict(shape)
    try:
        return mesh_from_config(shape, devices=own if own is not None else devices)
    except ValueError as err:
        raise ValueError(f"critic.mesh={shape} on {len(own if own is not None else devices)} critic devices: "
                         f"{err}") from err


def sampling_params(num_samples: int, *, temperature: float, top_p: float, max_new_tokens: int,
                    stop_tokens: Sequence[int] = ()) -> SamplingParams:
    """How the critic samples its `num_samples` critiques of each prompt."""
    return SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          stop_token_ids=tuple(stop_tokens))


class GenPRMCritic:
    """A generative process reward model on a Flax `Transformer`: implements `critic.base.Critic`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        mesh: jax.sharding.Mesh | None = None,
        max_prompt_tokens: int = DEFAULTS["max_prompt_tokens"],
        max_new_tokens: int = DEFAULTS["max_new_tokens"],
        temperature: float = DEFAULTS["temperature"],
        top_p: float = DEFAULTS["top_p"],
        batch_size: int = DEFAULTS["batch_size"],
        index_base: int = DEFAULTS["index_base"],
        template: str | PromptTemplate = DEFAULTS["template"],
        stop_tokens: Sequence[int] | None = None,
        rules: Any = None,
    ) -> None:
        check_settings(max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       temperature=temperature, top_p=top_p)
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.batch_size = int(batch_size)
        self.index_base = int(index_base)
        self.template, self.outcome_template = resolve_template(template)
        self.stop_tokens = list(stop_token_ids(tokenizer) if stop_tokens is None else stop_tokens)
        self._stats = CriticStats()

    @classmethod
    def from_config(cls, critic_cfg: Any, *, mesh: jax.sharding.Mesh | None = None, rules: Any = None,
                    devices: Sequence[jax.Device] | None = None) -> "GenPRMCritic":
        """Load the checkpoint and tokenizer at `critic_cfg.path` and shard them by `rules` (default:
        `inference_rules()`) on `mesh`, or else on `critic_mesh(critic_cfg, devices)`; KV heads that do not
        split evenly over the rules' tensor axis are repeated."""
        from transformers import AutoTokenizer

        from capo_jax.models import from_pretrained
        from capo_jax.parallel import inference_rules

        path = _cfg_get(critic_cfg, "path")
        if not path or not os.path.isdir(path):
            raise ValueError(f"critic.path={path!r} is not a folder: point it at a local Hugging Face "
                             "checkpoint folder (config.json, *.safetensors, tokenizer files)")
        settings = {key: _cfg_get(critic_cfg, key) for key in
                    ("max_prompt_tokens", "max_new_tokens", "temperature", "top_p", "batch_size")}
        check_settings(**settings)
        template = _cfg_get(critic_cfg, "template")
        resolve_template(template)
        if mesh is None:
            mesh = critic_mesh(critic_cfg, devices)
        rules = inference_rules() if rules is None else tuple(rules)
        dtype = _cfg_get(critic_cfg, "dtype")
        model = from_pretrained(path, dtype=dtype, param_dtype=dtype, mesh=mesh, rules=rules)
        model = InferenceCopy(model, mesh, rules, donate=True).refresh(model)  # repeats KV heads where needed
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(
            model,
            tokenizer,
            mesh=mesh,
            index_base=_cfg_get(critic_cfg, "index_base"),
            template=template,
            **settings,
            stop_tokens=stop_token_ids(tokenizer, path),
            rules=rules,
        )

    @property
    def last_stats(self) -> CriticStats:
        """Prompt tokens prefilled, tokens generated and seconds spent by the latest call."""
        return self._stats

    def critique(
        self, requests: Sequence[CritiqueRequest], num_samples: int, rng: np.random.Generator
    ) -> list[list[str]]:
        """M step critiques per request; a request with no steps or an over-budget prompt gets []."""
        prompts = [
            render_prompt(r.question, r.steps, reference=r.reference, template=self.template,
                          index_base=self.index_base, tokenizer=self.tokenizer) if r.steps else None
            for r in requests
        ]
        return self._generate(prompts, num_samples, rng)

    def judge_outcome(
        self, requests: Sequence[CritiqueRequest], num_samples: int, rng: np.random.Generator
    ) -> list[list[str]]:
        """M final-answer judgements per request (the `genorm` baseline); [] when over budget."""
        prompts = [
            render_outcome_prompt(r.question, r.steps, reference=r.reference, template=self.outcome_template,
                                  tokenizer=self.tokenizer)
            for r in requests
        ]
        return self._generate(prompts, num_samples, rng)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one rendered prompt (a chat-templated prompt already holds its special tokens)."""
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        return list(self.tokenizer(prompt, add_special_tokens=not templated)["input_ids"])

    def decode(self, row: np.ndarray, length: int) -> str:
        """Text of one sampled row, cut at its first stop token."""
        ids = [int(t) for t in row[: int(length)]]
        stops = set(self.stop_tokens)
        for k, t in enumerate(ids):
            if t in stops:
                ids = ids[:k]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generate(self, prompts: Sequence[str | None], num_samples: int, rng: np.random.Generator) -> list[list[str]]:
        """Tokenize, refuse over-budget prompts (and None), and sample `num_samples` texts per prompt
        with one prefill per prompt, `batch_size` prompts per generate call."""
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the critic needs at least one sample per request")
        start = time.perf_counter()
        encoded = [[] if p is None else self.encode(p) for p in prompts]
        # Similar lengths share a generate call: less padding in the prompt-length bucket.
        keep = sorted((i for i, ids in enumerate(encoded) if 0 < len(ids) <= self.max_prompt_tokens),
                      key=lambda i: len(encoded[i]))
        out: list[list[str]] = [[] for _ in prompts]
        params = sampling_params(num_samples, temperature=self.temperature, top_p=self.top_p,
                                 max_new_tokens=self.max_new_tokens, stop_tokens=self.stop_tokens)
        prompt_tokens = generated = 0
        calls = -(-len(keep) // self.batch_size)
        if multihost.spans_processes(self.mesh):  # every process makes as many (collective) calls, some maybe empty
            calls = int(multihost.allgather(np.int64(calls)).max())
        for lo in range(0, calls * self.batch_size, self.batch_size):
            chunk = keep[lo: lo + self.batch_size]
            key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
            result = generate(self.model, [encoded[i] for i in chunk], params, key, mesh=self.mesh, rules=self.rules)
            tokens = np.asarray(result.tokens)
            lengths = np.asarray(result.lengths)
            for c, i in enumerate(chunk):
                rows = range(c * num_samples, (c + 1) * num_samples)
                out[i] = [self.decode(tokens[r], lengths[r]) for r in rows]
            prompt_tokens += sum(len(encoded[i]) for i in chunk)
            generated += int(lengths.sum())
        self._stats = CriticStats(prompt_tokens=prompt_tokens, generated_tokens=generated,
                                  seconds=time.perf_counter() - start)
        return out
