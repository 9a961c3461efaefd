"""The one config schema of capo_jax: every knob with its default, loading, overrides, validation.

`get_default_config()` is the schema; a `configs/X.py` file's `get_config()` starts from it and
overrides; the command line (`--config.a.b=v`) overrides both. `validate()` fails at start-up
with one line per problem naming the key and the fix.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import os
import warnings
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

# Choices for the enumerated knobs (validated at start-up).
REWARD_MODES = ("capo", "grpo", "genorm")
NORMS = ("group_token", "group_seq", "center")
VOTES = ("intersection", "majority", "union", "average")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
OLD_LOGPROB_SOURCES = ("recompute", "sampler")
DTYPES = ("float32", "bfloat16")
CRITIC_BACKENDS = ("genprm", "rule")
RULE_SETS = ("policy", "inference")


# One line per config section, shown by `python -m capo_jax.train --help` (a test keeps it in step with the schema).
SECTION_HELP = {
    "policy": "the model being trained: its Hugging Face folder (empty for the demo), master dtype, remat",
    "reference": "the frozen reference of the KL term (loaded only when rl.kl_coef > 0)",
    "mesh": "the device mesh (data x fsdp x tensor) and each role's logical-axis rules",
    "rollout": "sampling: prompts per step P, responses per prompt G, temperature, prompt and response lengths",
    "critic": "the step critic: a GenPRM model folder (or the demo's rule critic), critiques per response M, vote",
    "reward": "reward mode (capo | grpo | genorm), outcome and step-penalty weights, normalisation, steps, verifier",
    "rl": "the PPO-clip update: epochs, mini- and micro-batches, clip range, dual clip, KL, loss aggregation",
    "optim": "AdamW, the learning-rate schedule, gradient clipping, the compute dtype",
    "data": "training prompts: source (arithmetic | hf | local | tfds), path, fields, template, the arithmetic world",
    "demo": "the embedded demo's bootstrap: the tiny model's shape, its supervised phase, and where it is cached",
    "checkpoint": "orbax checkpoints: every N steps, keep the last K, in the background",
    "logging": "metrics: TensorBoard, workdir/metrics.jsonl, the progress bar",
    "finish": "end-of-run outputs: a Hugging Face export and a PNG of the curves",
    "eval": "held-out evaluation during training: every N steps and at step 0, problems, samples per problem, temperature, greedy",
}


def describe_sections(config: ml_collections.ConfigDict | None = None) -> list[tuple[str, str]]:
    """(name, one line) for the top-level keys (as one entry) and then each section, in SECTION_HELP's order."""
    config = get_default_config() if config is None else config
    sections = {k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)}
    missing = sorted(sections - set(SECTION_HELP))
    if missing:
        raise KeyError(f"config sections {missing} have no line in SECTION_HELP (capo_jax/config.py): add one each")
    top = [k for k in config.keys() if k not in sections]
    out = [(", ".join(top), "run-wide: seed, steps, workdir, early stop, multi-host start")] if top else []
    return out + [(k, line) for k, line in SECTION_HELP.items() if k in sections]


class ConfigError(ValueError):
    """A config problem found at start-up; the message names the key and the fix."""


def _optional_defaults(module: str, attr: str = "DEFAULTS") -> dict:
    """Another module's config defaults (a plain dict), or {} while that module is absent."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return {}
    value = getattr(mod, attr, None)
    return dict(value) if isinstance(value, Mapping) else {}


def _merge_missing(section: ml_collections.ConfigDict, defaults: Mapping[str, Any]) -> None:
    """Add the keys another module declares that the schema does not already list."""
    for key, value in defaults.items():
        if key not in section:
            section[key] = ml_collections.ConfigDict(dict(value)) if isinstance(value, Mapping) else value


def get_default_config() -> ml_collections.ConfigDict:
    """The full schema with defaults; a config file overrides fields of this."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds every random stream (params init of the demo, rollouts, critic sampling, shuffles)
    c.total_steps = 100  # RL steps (one rollout batch each); the LR schedule decays over these
    c.workdir = "runs/capo"  # checkpoints, metrics, the stored config and the policy's HF config + tokenizer
    c.stop_after_steps = 0  # stop cleanly (checkpoint saved) after this many steps in this process; 0 = run to total_steps
    c.max_bad_steps = 3  # stop the run after this many consecutive steps whose update was skipped for NaN/inf
    c.distributed = "auto"  # join a multi-process job (capo_jax.distributed): auto (multi-host TPU VMs, or when a coordinator/count/id is given) | on | off
    c.distributed_coordinator = ""  # coordinator HOST:PORT (process 0's address); "" = $JAX_COORDINATOR_ADDRESS (Cloud TPU: found automatically)
    c.distributed_num_processes = -1  # processes in the job; -1 = $JAX_NUM_PROCESSES (Cloud TPU: found automatically)
    c.distributed_process_id = -1  # this process's id, 0..count-1; -1 = $JAX_PROCESS_ID (Cloud TPU: found automatically)

    c.policy = ml_collections.ConfigDict()
    c.policy.path = ""  # Hugging Face folder or hub id (owner/name[@revision]) of the policy; "" with data.source="arithmetic" bootstraps the demo policy
    c.policy.param_dtype = "float32"  # master weights and optimizer state (keep float32)
    c.policy.remat = True  # recompute each layer's activations in the backward pass (memory ~1/L, about 1/3 more compute)
    c.policy.model_id = ""  # hub id of the model policy.path holds (e.g. "Qwen/Qwen2.5-1.5B"): capo_jax.plan reads its shapes from a preset when the path is unset

    c.reference = ml_collections.ConfigDict()
    c.reference.path = ""  # frozen reference for the KL term (folder or hub id); "" = the policy's initial checkpoint; not loaded when rl.kl_coef == 0
    c.reference.dtype = "float32"  # compute and storage dtype of the reference: float32 | bfloat16

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1 fills the remaining devices)
    c.mesh.fsdp = 1  # fully-sharded axis size (parameters and batch split over it)
    c.mesh.tensor = 1  # tensor-parallel axis size (heads / mlp split over it)
    c.mesh.policy_rules = "policy"  # logical-axis rules of the policy: policy | inference (capo_jax.parallel)
    c.mesh.reference_rules = "inference"  # logical-axis rules of the reference model
    c.mesh.critic_rules = "inference"  # logical-axis rules of the critic model (on the critic's own mesh, critic.mesh)
    c.mesh.rollout_rules = "inference"  # logical-axis rules of the policy's rollout copy (compute dtype, resharded once per step)
    c.mesh.topology = ""  # the TPU slice this config is sized for (e.g. "v5e-32"); capo_jax.plan's default --topology

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 8  # P: prompts per RL step; the rollout batch is P * G responses
    c.rollout.group_size = 8  # G: responses sampled per prompt (the advantage group)
    c.rollout.temperature = 1.0  # sampling temperature of the policy
    c.rollout.top_k = 0  # top-k filter (0 = off)
    c.rollout.top_p = 1.0  # nucleus filter (1.0 = off)
    c.rollout.max_prompt_len = 512  # prompts are left-padded (and left-truncated) to this many tokens
    c.rollout.max_new_tokens = 1024  # T: response budget; also the constant of seq_mean_token_sum_norm
    c.rollout.kv_cache_dtype = ""  # sampler KV cache dtype ("" = the compute dtype)

    c.critic = ml_collections.ConfigDict()
    c.critic.backend = "genprm"  # genprm (Flax instruct LLM as GenPRM) | rule (synthetic demo critic)
    c.critic.path = ""  # Hugging Face folder or hub id of the GenPRM (a 70B-class instruct model in the paper)
    c.critic.num_critiques = 4  # M: critiques sampled per response
    c.critic.temperature = 1.0  # critic sampling temperature (M samples should differ)
    c.critic.top_p = 1.0  # critic nucleus filter (1.0 = off)
    c.critic.max_new_tokens = 1024  # critique length budget
    c.critic.max_prompt_tokens = 4096  # rendered critic prompts longer than this get no critique (outcome-only)
    c.critic.batch_size = 8  # responses prefilled together per critic generate call (x M sampled rows)
    c.critic.template = "default"  # critic prompt template name (capo_jax.critic)
    c.critic.index_base = 0  # step numbering shown to the critic: 0 (the paper's figures) or 1
    c.critic.vote = "intersection"  # intersection | majority | union | average (spec section 5)
    c.critic.include_reference = True  # show the reference answer to the critic
    c.critic.dtype = "bfloat16"  # critic weights and compute dtype (it is frozen)
    c.critic.devices = ""  # "" = share the policy's devices; or its own: "last:4", "first:2", "4,5,6,7" (policy gets the rest; with several processes, picked within each process's devices)
    c.critic.mesh = ml_collections.ConfigDict()  # the critic's own mesh over its devices (critic.devices, or all when shared)
    c.critic.mesh.data = -1  # critic data-parallel axis size (-1 fills the critic's devices)
    c.critic.mesh.fsdp = 1  # critic fsdp axis size (the inference rules replicate weights over it, like data)
    c.critic.mesh.tensor = 1  # critic tensor-parallel axis size (heads / mlp / vocab split over it; a 72B critic in bf16 needs it 16+ wide on v5e)
    c.critic.model_id = ""  # hub id of the model critic.path holds (e.g. "Qwen/Qwen2.5-72B-Instruct"): capo_jax.plan reads its shapes from a preset when the path is unset
    c.critic.misjudge_prob = 0.0  # rule backend only: probability that the synthetic critic flips a step's verdict
    _merge_missing(c.critic, _optional_defaults("capo_jax.critic.genprm"))

    c.reward = ml_collections.ConfigDict()
    c.reward.mode = "capo"  # capo (outcome + voted step penalty) | grpo (outcome only) | genorm (critic-judged outcome)
    c.reward.w_whole = 2.0  # W_whole: weight of the outcome reward
    c.reward.w_process = 1.0  # W_process: penalty on the tokens of a wrong step (keep < w_whole)
    c.reward.norm = "group_token"  # group_token | group_seq | center (spec section 7)
    c.reward.eps = 1e-6  # added to the group std
    c.reward.step_delimiter = "\n\n"  # responses are split into steps on this
    c.reward.unstepped_tokens = "none"  # tokens outside any step (e.g. EOS): none (spec: no process term) | nearest (the nearest step's)
    c.reward.max_steps = 32  # S: steps past this are folded into the last one
    c.reward.answer_format = "math"  # verifier answer format: math (boxed / #### / "the answer is", math-verify) | choice
    c.reward.verify_timeout = 10.0  # seconds per answer before the verifier gives up (the response counts wrong)

    c.rl = ml_collections.ConfigDict()
    c.rl.ppo_epochs = 1  # passes over each rollout batch
    c.rl.num_minibatches = 1  # optimizer updates per epoch (the batch is split into this many)
    c.rl.micro_batch_size = 8  # sequences per forward/backward; gradients accumulate exactly over a mini-batch
    c.rl.clip_low = 0.2  # PPO ratio clip below: 1 - clip_low
    c.rl.clip_high = 0.2  # PPO ratio clip above: 1 + clip_high
    c.rl.clip_ratio_c = 0.0  # dual clip (verl): for A < 0 the loss is capped at -A * c, c > 1 (e.g. 3.0); 0 = off
    c.rl.kl_coef = 0.0  # beta of the KL to the reference (0 = no reference model loaded)
    c.rl.kl_estimator = "k3"  # k1 | k2 | k3 (Schulman's estimators of KL(pi || pi_ref))
    c.rl.loss_agg = "token_mean"  # token_mean | seq_mean_token_mean (GRPO) | seq_mean_token_sum_norm (Dr.GRPO)
    c.rl.old_logprob_source = "recompute"  # recompute (forward of the pre-update policy) | sampler
    c.rl.logprob_chunk = 128  # response tokens per log-prob chunk (the [B,T,V] logits are never whole)
    c.rl.logprob_remat = True  # recompute each chunk's logits in the backward pass (False keeps [B,T,V] for one less head matmul)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6  # peak learning rate (AdamW)
    c.optim.warmup_steps = 0  # linear warm-up, in optimizer updates
    c.optim.min_lr_ratio = 0.1  # cosine decays to learning_rate * this at the last update
    c.optim.weight_decay = 0.01  # AdamW decoupled weight decay
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.grad_clip = 1.0  # global-norm gradient clip (0 = off)
    c.optim.compute_dtype = "float32"  # policy forward/backward (and sampler) dtype; master weights stay param_dtype

    c.data = ml_collections.ConfigDict()
    c.data.source = "arithmetic"  # dataset name understood by capo_jax.data.build_source
    _merge_missing(c.data, _optional_defaults("capo_jax.data"))

    c.demo = ml_collections.ConfigDict()  # the synthetic demo's bootstrap (used when policy.path == "")
    c.demo.cache_dir = ""  # bootstrapped demo policies are cached here by settings hash; "" = $CAPO_JAX_CACHE or ~/.cache/capo_jax
    for name in ("model", "sft"):  # the arithmetic world itself is data.world
        c.demo[name] = ml_collections.ConfigDict(
            _optional_defaults("capo_jax.demo.bootstrap", f"{name.upper()}_DEFAULTS")
        )

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # save every N steps (and at the end, and on SIGTERM)
    c.checkpoint.keep = 3  # keep the last K checkpoints
    c.checkpoint.async_save = True  # write checkpoints in the background

    c.logging = ml_collections.ConfigDict()
    c.logging.every = 1  # write metrics every N steps
    c.logging.tensorboard = True  # TensorBoard event files under workdir/tb
    c.logging.jsonl = True  # one JSON line per logged step in workdir/metrics.jsonl
    c.logging.progress = True  # progress bar on a terminal (plain lines otherwise)

    c.finish = ml_collections.ConfigDict()
    c.finish.export_hf = False  # at the end of the run, write the policy as a Hugging Face folder in workdir/hf_export
    c.finish.plot = False  # at the end of the run, plot metrics.jsonl to workdir/curves.png

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # evaluate held-out problems every N steps, and once before the first step (0 = never)
    c.eval.num_problems = 128  # held-out problems per evaluation
    c.eval.samples = 4  # responses sampled per problem at eval.temperature (sampled accuracy over problems x samples pairs; 0 = none)
    c.eval.temperature = -1.0  # sampling temperature of the sampled evaluation; -1 = rollout.temperature
    c.eval.greedy = True  # also evaluate one greedy response per problem
    c.eval.max_new_tokens = 0  # evaluation response budget (0 = rollout.max_new_tokens)
    return c


# ---------------------------------------------------------------------------------------------
# Loading and command-line overrides


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Run a `configs/X.py` file and return its `get_config()`."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist: pass --config configs/<name>.py")
    spec = importlib.util.spec_from_file_location("_capo_user_config", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(): define one returning a ConfigDict")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}; return an ml_collections.ConfigDict")
    return config


def _parse_value(text: str, current: Any) -> Any:
    """Turn command-line text into a value of the current field's type."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):  # a shell cannot type a newline: read \n, \t, \\ (LaTeX such as \boxed stays)
        from capo_jax.data.templates import read_escapes

        return read_escapes(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set `config.<dotted>` from command-line text, typed like the existing field."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), config))
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(_unknown_key_message(dotted, config))
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{dotted} names a section, not a value: set one of its fields, e.g. --config.{dotted}.<field>=...")
    try:
        node[leaf] = _parse_value(text, current)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--config.{dotted}={text!r}: {exc}; give a {type(current).__name__}") from None


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Parse `--config FILE [--config.a.b=v ...] [--workdir DIR]`; returns (config, unparsed args)."""
    argv = list(argv)
    path = None
    overrides: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file: --config configs/demo.py")
                path, i = argv[i + 1], i + 1
        elif arg.startswith("--config."):
            key = arg[len("--config."):]
            if "=" in key:
                key, value = key.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        elif arg == "--workdir" or arg.startswith("--workdir="):
            if "=" in arg:
                overrides.append(("workdir", arg.split("=", 1)[1]))
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--workdir needs a directory")
                overrides.append(("workdir", argv[i + 1]))
                i += 1
        else:
            rest.append(arg)
        i += 1
    config = load_config_file(path) if path else get_default_config()
    for key, value in overrides:
        apply_override(config, key, value)
    return config, rest


# ---------------------------------------------------------------------------------------------
# Validation


def _flat_keys(config: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            sub = _flat_keys(value, name + ".")
            out.update(sub if sub else {name: value})
        else:
            out[name] = value
    return out


def _unknown_key_message(key: str, schema: Mapping) -> str:
    known = list(_flat_keys(schema).keys())
    sections = sorted({k.rsplit(".", 1)[0] for k in known if "." in k})
    close = difflib.get_close_matches(key, known + sections, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "see capo_jax/config.py for the schema"
    return f"unknown config key {key!r}: {hint} (every knob is declared in capo_jax/config.py)"


def _exists(path: str) -> bool:
    """A local path, a gs:// path, or a Hugging Face hub id (resolved to a local snapshot when the run starts)."""
    from capo_jax.hub import is_hub_id

    return path.startswith("gs://") or os.path.exists(path) or is_hub_id(path)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int, section: str = "mesh",
               role: str = "policy") -> tuple[int, int, int]:
    """The (data, fsdp, tensor) mesh of config section `section` (the policy's `mesh`, or `critic.mesh`) on
    `num_devices`, with the one -1 axis filled in."""
    node = config
    for part in section.split("."):
        node = node[part]
    shape = [int(node.data), int(node.fsdp), int(node.tensor)]
    if shape.count(-1) > 1 or any(v == 0 or v < -1 for v in shape):
        raise ConfigError(f"{section} data={shape[0]} fsdp={shape[1]} tensor={shape[2]}: give positive sizes with at most one -1 (fill)")
    fixed = int(np.prod([v for v in shape if v != -1]))
    if -1 in shape:
        if num_devices % fixed:
            raise ConfigError(f"{section} data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} does not fit the {role}'s {num_devices} devices: "
                              f"the fixed axes ({fixed}) must divide {num_devices}")
        shape[shape.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"{section} data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} does not fit the {role}'s {num_devices} devices: "
                          f"make the product {num_devices} (or set one axis to -1 to fill)")
    return shape[0], shape[1], shape[2]


def data_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """How many ways the batch is split: the mesh's data x fsdp axes."""
    d, f, _ = mesh_shape(config, num_devices)
    return d * f


def uses_llm_critic(config: ml_collections.ConfigDict) -> bool:
    """Whether the run loads a GenPRM critic model (a critic-using reward mode with the genprm backend)."""
    return config.critic.backend == "genprm" and config.reward.mode != "grpo"


def role_devices(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> tuple[list, list | None]:
    """Split the devices between the policy and the critic: (policy's, critic's or None when shared)."""
    from capo_jax.critic.genprm import select_devices

    devices = list(devices)
    critic = select_devices(config.critic.devices, devices) if uses_llm_critic(config) else None
    if critic is None:
        return devices, None
    policy = [d for d in devices if d not in critic]
    if not policy:
        raise ValueError(f"critic.devices={config.critic.devices!r} takes every device: leave some for the policy (e.g. 'last:{len(devices) // 2}')")
    return policy, critic


@dataclasses.dataclass(frozen=True)
class _DeviceSlot:
    """A stand-in device for validation: its number and its process."""

    id: int
    process_index: int


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None, check_paths: bool = True,
             num_processes: int = 1) -> None:
    """Raise ConfigError on the first inconsistency (one line: the key and the fix); warn on doubtful choices.
    `num_devices` (all processes' together) split evenly over `num_processes`."""
    schema = get_default_config()
    flat_schema = _flat_keys(schema)
    for key in _flat_keys(config):
        if key not in flat_schema and not any(key.startswith(s + ".") for s in flat_schema if isinstance(flat_schema[s], dict)):
            raise ConfigError(_unknown_key_message(key, schema))

    def choice(key: str, options: Sequence[str]) -> None:
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of {list(options)}: set --config.{key}=<one of them>")

    choice("distributed", ("auto", "on", "off"))
    choice("reward.mode", REWARD_MODES)
    choice("reward.norm", NORMS)
    choice("reward.unstepped_tokens", ("none", "nearest"))
    choice("reward.answer_format", ("math", "choice"))
    choice("critic.vote", VOTES)
    choice("critic.backend", CRITIC_BACKENDS)
    choice("rl.kl_estimator", KL_ESTIMATORS)
    choice("rl.loss_agg", LOSS_AGGS)
    choice("rl.old_logprob_source", OLD_LOGPROB_SOURCES)
    choice("optim.compute_dtype", DTYPES)
    choice("policy.param_dtype", DTYPES)
    choice("reference.dtype", DTYPES)
    choice("mesh.policy_rules", RULE_SETS)
    choice("mesh.reference_rules", RULE_SETS)
    choice("mesh.critic_rules", RULE_SETS)
    choice("mesh.rollout_rules", RULE_SETS)

    P, G = int(config.rollout.prompts_per_step), int(config.rollout.group_size)
    for key, value in (("rollout.prompts_per_step", P), ("rollout.group_size", G), ("critic.num_critiques", config.critic.num_critiques),
                       ("rl.ppo_epochs", config.rl.ppo_epochs), ("rl.num_minibatches", config.rl.num_minibatches),
                       ("rl.micro_batch_size", config.rl.micro_batch_size), ("rl.logprob_chunk", config.rl.logprob_chunk),
                       ("rollout.max_new_tokens", config.rollout.max_new_tokens), ("rollout.max_prompt_len", config.rollout.max_prompt_len),
                       ("reward.max_steps", config.reward.max_steps), ("total_steps", config.total_steps),
                       ("checkpoint.every", config.checkpoint.every), ("checkpoint.keep", config.checkpoint.keep)):
        if int(value) < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    c_dual = float(config.rl.clip_ratio_c)
    if c_dual != 0.0 and not c_dual > 1.0:
        raise ConfigError(f"rl.clip_ratio_c={c_dual}: the dual clip needs c > 1 (verl uses 3.0); set --config.rl.clip_ratio_c=0 to turn it off")
    if int(config.eval.num_problems) < 1 or int(config.eval.samples) < 0:
        raise ConfigError(f"eval.num_problems={config.eval.num_problems} must be >= 1 and eval.samples={config.eval.samples} >= 0")
    if not (float(config.eval.temperature) == -1.0 or float(config.eval.temperature) >= 0.0):
        raise ConfigError(f"eval.temperature={config.eval.temperature}: use -1 (the rollout temperature), 0 (greedy) or a positive value")
    if G < 2:
        raise ConfigError(f"rollout.group_size={G}: group advantages need at least 2 responses per prompt; set --config.rollout.group_size=2 or more")
    batch = P * G
    minibatches = int(config.rl.num_minibatches)
    if batch % minibatches:
        raise ConfigError(f"rollout batch {P}x{G}={batch} is not divisible by rl.num_minibatches={minibatches}: pick a divisor of {batch}")
    minibatch = batch // minibatches
    micro = int(config.rl.micro_batch_size)
    if minibatch % micro:
        raise ConfigError(f"mini-batch {minibatch} is not divisible by rl.micro_batch_size={micro}: pick a divisor of {minibatch}")
    T = int(config.rollout.max_new_tokens)
    if T % int(config.rl.logprob_chunk):
        raise ConfigError(f"rollout.max_new_tokens={T} is not divisible by rl.logprob_chunk={config.rl.logprob_chunk}: pick a divisor of {T}")
    if num_devices is not None:
        try:
            per = max(num_devices // max(int(num_processes), 1), 1)
            slots = [_DeviceSlot(i, i // per) for i in range(num_devices)]  # stand-ins: the split is per process
            policy_list, critic_list = role_devices(config, slots)
        except ValueError as exc:
            raise ConfigError(f"{exc}") from None
        policy_devices = len(policy_list)
        if uses_llm_critic(config):
            mesh_shape(config, len(critic_list) if critic_list else num_devices, "critic.mesh", "critic")
        dp = data_parallel_size(config, policy_devices)
        if micro % dp:
            raise ConfigError(f"rl.micro_batch_size={micro} is not divisible by the data-parallel size {dp} (mesh data x fsdp): "
                              f"make it a multiple of {dp}")
        if batch % dp:
            raise ConfigError(f"rollout batch {batch} is not divisible by the data-parallel size {dp}: make prompts_per_step x group_size a multiple of {dp}")
    if float(config.reward.w_process) >= float(config.reward.w_whole) and config.reward.mode == "capo":
        warnings.warn(
            f"reward.w_process={config.reward.w_process} >= reward.w_whole={config.reward.w_whole}: a flawed correct answer can then "
            "score no better than a clean wrong one; the spec keeps W_whole > W_process so the outcome comes first",
            stacklevel=2,
        )
    if check_paths:
        _validate_paths(config)


def _validate_paths(config: ml_collections.ConfigDict) -> None:
    if str(config.workdir).startswith("gs://"):
        raise ConfigError(f"workdir={config.workdir!r}: metrics and run files need a POSIX path; mount the bucket (e.g. gcsfuse) "
                          "and pass the mount's path (docs/multihost.md)")
    if not config.policy.path:
        if config.data.source != "arithmetic":
            raise ConfigError("policy.path is not set: pass --config.policy.path=/path/to/hf_policy_folder "
                              "(only the arithmetic demo bootstraps its own policy)")
    elif not _exists(config.policy.path):
        raise ConfigError(f"policy.path={config.policy.path!r} does not exist: point --config.policy.path at a Hugging Face model folder or hub id (owner/name)")
    if config.rl.kl_coef > 0 and config.reference.path and not _exists(config.reference.path):
        raise ConfigError(f"reference.path={config.reference.path!r} does not exist: fix it or set --config.reference.path='' to use the policy's checkpoint")
    if uses_llm_critic(config):  # reward.mode is one of REWARD_MODES by now
        if not config.critic.path:
            raise ConfigError("critic.path is not set: pass --config.critic.path=/path/to/instruct_model "
                              "(the paper uses a 70B-class instruct model, e.g. Qwen2.5-72B-Instruct)")
        if not _exists(config.critic.path):
            raise ConfigError(f"critic.path={config.critic.path!r} does not exist: point --config.critic.path at a Hugging Face model folder or hub id (owner/name)")
    source = config.data.source
    if source != "arithmetic" and not config.data.get("path", ""):
        raise ConfigError(f"data.path is not set for data.source={source!r}: pass --config.data.path=<dataset id, file or folder>")
    if source == "local":
        import glob

        if not glob.glob(config.data.path) and not config.data.path.startswith("gs://"):
            raise ConfigError(f"data.path={config.data.path!r} matches no file or folder: fix --config.data.path")


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A plain dict (JSON-able) of the config."""
    return config.to_dict()
