"""Record loaders (Hugging Face hub / local files / TFDS / the arithmetic world) and the resumable, sharded PromptSource."""
from __future__ import annotations

import collections
import dataclasses
import glob
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from capo_jax.data.templates import encode_prompt, normalize_answer, render_prompt

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SKIP_REASONS = ("bad_record", "missing_question", "missing_answer", "prompt_too_long")


@dataclasses.dataclass(frozen=True)
class Example:
    """One training prompt: question, reference answer, rendered prompt text and its token ids."""

    question: str
    answer: str
    prompt: str
    prompt_ids: tuple[int, ...] = ()
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def get_field(record: Any, field: str) -> Any:
    """`record[field]`, following dotted paths (`a.b`) into nested records; None when absent."""
    value = record
    for part in field.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def load_hf(path: str, *, name: str = "", split: str = "train", cache_dir: str | None = None):
    """A Hugging Face dataset split by hub id (or a local dataset script-free folder)."""
    import datasets

    try:
        return datasets.load_dataset(path, name or None, split=split, cache_dir=cache_dir)
    except Exception as e:  # network, unknown id, gated: say what to do instead
        raise ValueError(
            f"could not load the Hugging Face dataset {path!r} (config {name or None!r}, split {split!r}): {e}. "
            "Offline, download it elsewhere and point source='local' at its json/jsonl/parquet files."
        ) from e


def load_local(path: str, *, split: str = "train"):
    """Local records: a json / jsonl / parquet / csv file or glob, or a folder written by `Dataset.save_to_disk`."""
    import datasets

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}; set data.split")
                ds = ds[split]
            return ds
        files = sorted(f for ext in _LOCAL_BUILDERS for f in glob.glob(os.path.join(path, f"*{ext}")))
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise ValueError(f"no data files at {path!r}; give a .json/.jsonl/.parquet/.csv file, a glob, or a saved dataset folder")
    kinds = {_LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"local data files must all be one of {sorted(_LOCAL_BUILDERS)}; got {files[:5]}")
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train")


class _DecodedTFDS(collections.abc.Sequence):
    """A TFDS random-access data source with bytes fields decoded to str."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        return _decode(self._source[int(i)])


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()] if value.ndim else _decode(value.item())
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    return value


def load_tfds(name: str, *, split: str = "train", data_dir: str = ""):
    """A TFDS split by registered name, read through TFDS's random-access data source (no TensorFlow needed).

    The dataset must be prepared in `array_record` format (TFDS's default `tfrecord` needs TensorFlow).
    """
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir or None,
            builder_kwargs={"file_format": "array_record"},
        )
    except Exception as e:
        raise ValueError(
            f"could not open the TFDS dataset {name!r} split {split!r} (data_dir {data_dir or 'default'!r}): {e}. "
            "Prepare it with file_format='array_record' (tfrecord needs TensorFlow), or set data.data_dir."
        ) from e
    return _DecodedTFDS(source)


class PromptSource:
    """Deterministic, resumable, host-sharded stream of training prompts over random-access records.

    All hosts walk the same global order (a seeded permutation per epoch, or the record order
    when `shuffle` is off; an unbounded generator when `num_records` is None) and skip the same
    malformed records, so their `state()` is identical; each call takes the next
    `num_prompts * process_count` valid records and host `process_index` keeps its slice.
    """

    def __init__(
        self,
        get_record: Callable[[int], Any],
        num_records: int | None,
        render: Callable[[str], tuple[str, list[int]]],
        *,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_format: str = "raw",
        max_prompt_tokens: int = 512,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if num_records is not None and num_records <= 0:
            raise ValueError("the dataset is empty; check data.path and data.split")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        normalize_answer(None, answer_format)  # validates the format name
        self._get_record = get_record
        self.num_records = num_records
        self._render = render
        self.question_field, self.answer_field, self.answer_format = question_field, answer_field, answer_format
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self._epoch, self._offset, self._served = 0, 0, 0
        self._skipped = {r: 0 for r in SKIP_REASONS}
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def stats(self) -> dict[str, int]:
        """Counts of skipped records by reason (global: every host counts the same), plus position."""
        return {**{f"skipped_{r}": n for r, n in self._skipped.items()}, "served": self._served, "epoch": self._epoch}

    def state(self) -> dict[str, int]:
        """The position to checkpoint (plain ints, identical on every host)."""
        return {
            "epoch": self._epoch,
            "offset": self._offset,
            "served": self._served,
            "seed": self.seed,
            "num_records": -1 if self.num_records is None else self.num_records,
            **{f"skipped_{r}": n for r, n in self._skipped.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from `state()`: the next batches are those that would have followed."""
        n = -1 if self.num_records is None else self.num_records
        if int(state.get("num_records", n)) != n or int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data state was saved for {state.get('num_records')} records with seed {state.get('seed')}, "
                f"but this source has {n} records and seed {self.seed}; resume with the same data settings"
            )
        self._epoch, self._offset, self._served = int(state["epoch"]), int(state["offset"]), int(state["served"])
        for r in SKIP_REASONS:
            self._skipped[r] = int(state.get(f"skipped_{r}", 0))

    def _record_index(self) -> int:
        if self.num_records is None:
            return self._offset
        if not self.shuffle:
            return self._offset
        if self._perm is None or self._perm[0] != self._epoch:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(self.num_records)
            self._perm = (self._epoch, order)
        return int(self._perm[1][self._offset])

    def _advance(self) -> None:
        self._offset += 1
        if self.num_records is not None and self._offset >= self.num_records:
            self._epoch, self._offset = self._epoch + 1, 0

    def _make(self, index: int) -> Example | str:
        record = self._get_record(index)
        if not isinstance(record, Mapping):
            return "bad_record"
        q = get_field(record, self.question_field)
        if isinstance(q, bytes):
            q = q.decode("utf-8", errors="replace")
        if not isinstance(q, str) or not q.strip():
            return "missing_question"
        answer = normalize_answer(get_field(record, self.answer_field), self.answer_format)
        if answer is None:
            return "missing_answer"
        prompt, ids = self._render(q)
        if len(ids) > self.max_prompt_tokens:
            return "prompt_too_long"
        meta = {"index": int(index), "epoch": self._epoch}
        if "meta" in record and isinstance(record["meta"], Mapping):
            meta.update(record["meta"])
        return Example(question=q, answer=answer, prompt=prompt, prompt_ids=tuple(ids), meta=meta)

    def next_batch(self, num_prompts: int) -> list[Example]:
        """This host's `num_prompts` next examples (the global batch is `num_prompts * process_count`)."""
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be positive, got {num_prompts}")
        need = num_prompts * self.process_count
        valid: list[Example] = []
        misses = 0
        while len(valid) < need:
            out = self._make(self._record_index())
            self._advance()
            if isinstance(out, str):
                self._skipped[out] += 1
                misses += 1
                if misses > (self.num_records if self.num_records is not None else 100_000):
                    raise ValueError(f"no usable record in a whole pass over the data; skipped so far: {self.stats}")
                continue
            misses = 0
            valid.append(out)
        self._served += need
        return valid[self.process_index * num_prompts : (self.process_index + 1) * num_prompts]

    def __iter__(self):
        """Endless single examples (this host's share), for quick looks."""
        while True:
            yield from self.next_batch(1)


def records_source(
    records: Sequence[Any],
    render: Callable[[str], tuple[str, list[int]]],
    **kwargs: Any,
) -> PromptSource:
    """A PromptSource over an in-memory or random-access sequence of records."""
    return PromptSource(lambda i: records[i], len(records), render, **kwargs)


def make_renderer(
    tokenizer: Any, template: str, *, use_chat_template: bool = False, system_prompt: str = ""
) -> Callable[[str], tuple[str, list[int]]]:
    """question -> (prompt text, prompt token ids) with one template and tokenizer."""
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template is set but the tokenizer has no chat template; unset it or use an instruct tokenizer")

    def render(question: str) -> tuple[str, list[int]]:
        prompt = render_prompt(
            question, template, tokenizer=tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt
        )
        return prompt, encode_prompt(tokenizer, prompt, use_chat_template=use_chat_template)

    return render
