"""The evaluation benchmarks: a registry of hub ids, splits, fields and answer formats, and their loaders.

Math sets are scored by the math verifier; multiple-choice sets (ARC-Challenge, GPQA-Diamond,
MMLU-Pro) render their options as lettered lines in the question and are scored on the letter.
Each loads from the hub, or from `<data_dir>/<name>.{jsonl,json,parquet}` (or a folder of that
name) holding records with the hub's own field names. `arithmetic` is the demo world's held-out
split, generated from the world's knobs (no file), prompted with the world's own template.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from capo_jax.data.sources import get_field, load_hf, load_local
from capo_jax.data.templates import CHOICE_TEMPLATE, MATH_TEMPLATE, normalize_answer

LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives and how to read one record of it."""

    name: str
    hub_id: str
    config: str
    split: str
    question_field: str
    answer_field: str
    answer_format: str  # math (math-verify equivalence) | choice (option letter)
    reference_format: str = "raw"  # how the reference sits in its field: raw | gsm8k | boxed
    choices: str = ""  # how the options are stored: "" (none) | arc | list | gpqa
    domain: str = "math"  # math | ood | demo
    prompt_template: str = ""  # "" = the answer format's default

    @property
    def template(self) -> str:
        """The default prompt template: the benchmark's own, else its answer format's."""
        if self.prompt_template:
            return self.prompt_template
        return CHOICE_TEMPLATE if self.answer_format == "choice" else MATH_TEMPLATE


REGISTRY: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("math500", "HuggingFaceH4/MATH-500", "", "test", "problem", "answer", "math"),
        Benchmark("gsm8k", "openai/gsm8k", "main", "test", "question", "answer", "math", reference_format="gsm8k"),
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "", "train", "problem", "answer", "math"),
        Benchmark("amc23", "math-ai/amc23", "", "test", "question", "answer", "math"),
        Benchmark("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "question", "answerKey", "choice",
                  choices="arc", domain="ood"),
        Benchmark("gpqa_diamond", "Idavidrein/gpqa", "gpqa_diamond", "train", "Question", "Correct Answer", "choice",
                  choices="gpqa", domain="ood"),
        Benchmark("mmlu_pro", "TIGER-Lab/MMLU-Pro", "", "test", "question", "answer", "choice", choices="list",
                  domain="ood"),
    )
}
ARITHMETIC = "arithmetic"  # the demo world's held-out split (not a hub set: generated, see arithmetic_benchmark)
_ALIASES = {"math-500": "math500", "aime2024": "aime24", "amc2023": "amc23", "arc-challenge": "arc_challenge",
            "arc": "arc_challenge", "gpqa": "gpqa_diamond", "gpqa-diamond": "gpqa_diamond", "mmlu-pro": "mmlu_pro"}


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation question: the text to put in the prompt (options included) and the reference answer."""

    question: str
    reference: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def get_benchmark(name: str) -> Benchmark:
    """The registry entry for a benchmark name (case-insensitive; common spellings accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(REGISTRY) + [ARITHMETIC]} (or file:<path> for a local file)")
    return REGISTRY[key]


def render_options(question: str, options: Sequence[str]) -> str:
    """The question followed by one `X. option` line per option."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} options, got {len(options)}")
    return question.strip() + "\n\n" + "\n".join(f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options))


def _stable_rng(text: str, seed: int) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def make_item(bench: Benchmark, record: Mapping[str, Any], *, seed: int = 0) -> Item | None:
    """The Item for one record, or None when the record lacks a question or a usable answer."""
    question = get_field(record, bench.question_field)
    if not isinstance(question, str) or not question.strip():
        return None
    if not bench.choices:
        ref = normalize_answer(get_field(record, bench.answer_field), bench.reference_format)
        return None if ref is None else Item(question.strip(), ref)
    if bench.choices == "arc":
        choices = get_field(record, "choices") or {}
        texts, labels = list(choices.get("text") or []), [str(x) for x in choices.get("label") or []]
        key = str(get_field(record, bench.answer_field) or "").strip()
        if not texts or len(texts) != len(labels) or key not in labels:
            return None
        return Item(render_options(question, texts), LETTERS[labels.index(key)])
    if bench.choices == "list":
        options = list(get_field(record, "options") or [])
        while options and str(options[-1]).strip() == "N/A":  # MMLU-Pro pads short option lists
            options.pop()
        key = str(get_field(record, bench.answer_field) or "").strip().upper()
        if not options or len(key) != 1 or key not in LETTERS[: len(options)]:
            return None
        return Item(render_options(question, options), key)
    if bench.choices == "gpqa":
        correct = get_field(record, bench.answer_field)
        wrong = [get_field(record, f"Incorrect Answer {i}") for i in (1, 2, 3)]
        if not isinstance(correct, str) or not all(isinstance(w, str) and w.strip() for w in wrong):
            return None
        options = [correct] + wrong
        order = _stable_rng(question, seed).permutation(len(options))  # same shuffle on every run
        shuffled = [options[i] for i in order]
        return Item(render_options(question, shuffled), LETTERS[int(np.argmax(order == 0))])
    raise ValueError(f"benchmark {bench.name} has unknown choices kind {bench.choices!r}")


def _local_path(data_dir: str, name: str) -> str | None:
    for ext in (".jsonl", ".json", ".parquet"):
        if os.path.isfile(os.path.join(data_dir, name + ext)):
            return os.path.join(data_dir, name + ext)
    return os.path.join(data_dir, name) if os.path.isdir(os.path.join(data_dir, name)) else None


def load_records(bench: Benchmark, data_dir: str = "") -> Iterable[Mapping[str, Any]]:
    """A benchmark's records from `data_dir` when it holds them, else from the hub."""
    if data_dir:
        path = _local_path(data_dir, bench.name)
        if path is not None:
            return load_local(path, split=bench.split)
    try:
        return load_hf(bench.hub_id, name=bench.config, split=bench.split)
    except ValueError as e:
        where = f"{data_dir}/{bench.name}.jsonl (or .json/.parquet/folder)" if data_dir else "--data_dir"
        raise ValueError(f"benchmark {bench.name}: not found in {where} and the hub is unreachable ({e})") from None


def load_benchmark(
    name: str, *, data_dir: str = "", limit: int = 0, seed: int = 0, world: Mapping[str, Any] | None = None
) -> tuple[Benchmark, list[Item], int]:
    """(registry entry, items, number of records skipped as malformed); `limit` > 0 keeps the first `limit`.

    `world` holds the arithmetic world's knobs for the `arithmetic` benchmark (None: the defaults).
    """
    if name.strip().lower() == ARITHMETIC:
        return arithmetic_benchmark(world, limit=limit)
    bench = get_benchmark(name)
    return (bench, *_items(bench, load_records(bench, data_dir), limit, seed))


def arithmetic_benchmark(world: Mapping[str, Any] | None = None, *, limit: int = 0) -> tuple[Benchmark, list[Item], int]:
    """The arithmetic world's held-out test split (the demo's evaluation set) as a benchmark scored by the math verifier."""
    from capo_jax.data.arithmetic import DEFAULT_TEMPLATE, ArithmeticWorld

    tests = ArithmeticWorld(dict(world or {})).test_set()
    if limit:
        tests = tests[:limit]
    bench = Benchmark(ARITHMETIC, "", "", "test", "question", "answer", "math", domain="demo",
                      prompt_template=DEFAULT_TEMPLATE)
    return bench, [Item(p.question, p.answer, {"num_ops": len(p.ops)}) for p in tests], 0


def local_benchmark(
    path: str,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "math",
    reference_format: str = "raw",
    limit: int = 0,
) -> tuple[Benchmark, list[Item], int]:
    """Any local json/jsonl/parquet file of question/answer records as a benchmark."""
    if answer_format not in ("math", "choice"):
        raise ValueError(f"answer_format must be math or choice, got {answer_format!r}")
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    bench = Benchmark(name, path, "", "train", question_field, answer_field, answer_format, reference_format, domain="local")
    return (bench, *_items(bench, load_local(path), limit, 0))


def _items(bench: Benchmark, records: Iterable[Mapping[str, Any]], limit: int, seed: int) -> tuple[list[Item], int]:
    items, skipped = [], 0
    for record in records:
        item = make_item(bench, record, seed=seed) if isinstance(record, Mapping) else None
        if item is None:
            skipped += 1
            continue
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"benchmark {bench.name}: no usable record (skipped {skipped}); check its fields")
    return items, skipped
