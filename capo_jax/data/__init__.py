"""Training prompts, prompt templates, benchmarks and the synthetic arithmetic world.

`build_source(data_cfg, tokenizer)` returns a `PromptSource` whose `next_batch(n)` gives this
host's share of the next prompts, in a seeded order that `state()` / `restore()` resume.
"""
from __future__ import annotations

from typing import Any, Mapping

from capo_jax.data.arithmetic import DEFAULT_TEMPLATE as ARITHMETIC_TEMPLATE
from capo_jax.data.arithmetic import WORLD_DEFAULTS, ArithmeticWorld
from capo_jax.data.sources import (
    Example,
    PromptSource,
    load_hf,
    load_local,
    load_tfds,
    make_renderer,
    records_source,
)
from capo_jax.data.templates import MATH_TEMPLATE, check_template, encode_prompt, render_prompt

# The `data` section of the config schema: field, default, meaning.
DEFAULTS: dict = {
    "source": "arithmetic",  # arithmetic | hf (hub id) | local (json/jsonl/parquet/csv file, glob or saved dataset dir) | tfds (registered name)
    "path": "",  # hub id (hf), file / glob / directory (local), dataset name e.g. "my_ds:1.0.0" (tfds)
    "name": "",  # hf dataset config (subset) name; "" = none
    "split": "train",  # split to read (hf, local, tfds, arithmetic: train | test)
    "data_dir": "",  # tfds data_dir; "" = TFDS default (~/tensorflow_datasets)
    "question_field": "question",  # record field holding the question (dotted path for nested fields)
    "answer_field": "answer",  # record field holding the reference answer
    "answer_format": "raw",  # raw | gsm8k (keep the text after '####') | boxed (keep the last \boxed{} of a solution)
    "template": "",  # python format string with {question}; "" = the source's default (arithmetic: "{question}\n", else the math CoT prompt)
    "use_chat_template": False,  # wrap the formatted text as a user turn with the tokenizer's chat template
    "system_prompt": "",  # system message for the chat template; "" = none
    "max_prompt_tokens": 512,  # records whose rendered prompt is longer are skipped (counted in stats)
    "seed": 0,  # order seed; each epoch reshuffles with (seed, epoch); for arithmetic it picks the problem stream
    "shuffle": True,  # False keeps the file order (still sharded, still resumable)
    "process_index": -1,  # this host's shard; -1 = jax.process_index()
    "process_count": -1,  # number of shards; -1 = jax.process_count()
    "world": dict(WORLD_DEFAULTS),  # the synthetic arithmetic world's knobs (source == "arithmetic")
}

SOURCES = ("arithmetic", "hf", "local", "tfds")


def data_config(data_cfg: Any = None) -> dict:
    """`DEFAULTS` overridden by `data_cfg` (dict or ConfigDict); unknown keys raise naming the key."""
    given = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else (data_cfg or {}))
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown data settings {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **given}
    cfg["world"] = {**WORLD_DEFAULTS, **dict(given.get("world") or {})}
    if cfg["source"] not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {cfg['source']!r}")
    if cfg["source"] != "arithmetic" and not cfg["path"]:
        raise ValueError(f"data.source={cfg['source']!r} needs data.path (hub id, file/glob/folder, or TFDS name)")
    if int(cfg["max_prompt_tokens"]) <= 0:
        raise ValueError("data.max_prompt_tokens must be positive")
    return cfg


def _shard(cfg: Mapping[str, Any], process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = process_index if process_index is not None else int(cfg["process_index"])
    count = process_count if process_count is not None else int(cfg["process_count"])
    if index < 0 or count < 0:
        import jax

        index = jax.process_index() if index < 0 else index
        count = jax.process_count() if count < 0 else count
    return index, count


def build_source(
    data_cfg: Any,
    tokenizer: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PromptSource:
    """The training PromptSource the config describes (fields and defaults: `DEFAULTS`)."""
    cfg = data_config(data_cfg)
    index, count = _shard(cfg, process_index, process_count)
    default_template = ARITHMETIC_TEMPLATE if cfg["source"] == "arithmetic" else MATH_TEMPLATE
    template = check_template(cfg["template"] or default_template)
    render = make_renderer(
        tokenizer, template, use_chat_template=bool(cfg["use_chat_template"]), system_prompt=cfg["system_prompt"]
    )
    common = dict(
        max_prompt_tokens=int(cfg["max_prompt_tokens"]),
        seed=int(cfg["seed"]),
        shuffle=bool(cfg["shuffle"]),
        process_index=index,
        process_count=count,
    )
    if cfg["source"] == "arithmetic":
        world = ArithmeticWorld(cfg["world"])
        if cfg["split"] == "test":
            tests = world.test_set()
            records = [{"question": p.question, "answer": p.answer, "meta": {"num_ops": len(p.ops)}} for p in tests]
            return records_source(records, render, **common)
        if cfg["split"] != "train":
            raise ValueError(f"the arithmetic world has splits 'train' and 'test', not {cfg['split']!r}")

        def get(i: int) -> dict:
            p = world.problem(i, "train", stream=int(cfg["seed"]))
            return {"question": p.question, "answer": p.answer, "meta": {"num_ops": len(p.ops)}}

        return PromptSource(get, None, render, **common)
    if cfg["source"] == "hf":
        records = load_hf(cfg["path"], name=cfg["name"], split=cfg["split"])
    elif cfg["source"] == "local":
        records = load_local(cfg["path"], split=cfg["split"])
    else:
        records = load_tfds(cfg["path"], split=cfg["split"], data_dir=cfg["data_dir"])
    return records_source(
        records,
        render,
        question_field=cfg["question_field"],
        answer_field=cfg["answer_field"],
        answer_format=cfg["answer_format"],
        **common,
    )


__all__ = [
    "DEFAULTS",
    "WORLD_DEFAULTS",
    "ArithmeticWorld",
    "Example",
    "PromptSource",
    "build_source",
    "data_config",
    "encode_prompt",
    "render_prompt",
]
