"""Training prompts, prompt templates, benchmarks and the synthetic arithmetic world.

`build_source(data_cfg, tokenizer)` returns a `PromptSource` whose `next_batch(n)` gives this
host's share of the next prompts, in a seeded order that `state()` / `restore()` resume.
"""
from __future__ import annotations

from capo_jax.data.arithmetic import WORLD_DEFAULTS

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
    "template": "",  # python format string with {question}; "" = the source's default (see templates.py)
    "use_chat_template": False,  # wrap the formatted text as a user turn with the tokenizer's chat template
    "system_prompt": "",  # system message for the chat template; "" = none
    "max_prompt_tokens": 512,  # records whose rendered prompt is longer are skipped (counted in stats)
    "seed": 0,  # order seed; each epoch reshuffles with (seed, epoch)
    "shuffle": True,  # False keeps the file order (still sharded, still resumable)
    "process_index": -1,  # this host's shard; -1 = jax.process_index()
    "process_count": -1,  # number of shards; -1 = jax.process_count()
    "world": dict(WORLD_DEFAULTS),  # the synthetic arithmetic world's knobs (source == "arithmetic")
}

__all__ = ["DEFAULTS", "WORLD_DEFAULTS"]
