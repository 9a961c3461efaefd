"""Training data: seeded order, resume, per-host sharding, malformed records, local parquet and TFDS sources."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_jax.data import DEFAULTS, build_source, data_config
from capo_jax.data.templates import check_template, last_boxed, normalize_answer
from capo_jax.data.tokenizer import build_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOK = build_tokenizer()


def _records(n: int) -> list[dict]:
    return [{"question": f"Compute {i} + 1.", "answer": str(i + 1)} for i in range(n)]


def _write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _local(path, **kw):
    cfg = {"source": "local", "path": path, "template": "{question}\n", "process_index": 0, "process_count": 1, **kw}
    return build_source(cfg, TOK)


def _qs(batch):
    return [e.question for e in batch]


def test_order_is_deterministic_and_epochs_reshuffle(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(12))
    a, b, c = _local(path, seed=1), _local(path, seed=1), _local(path, seed=2)
    epoch_a = [_qs(a.next_batch(4)) for _ in range(6)]
    assert epoch_a == [_qs(b.next_batch(4)) for _ in range(6)]
    assert epoch_a != [_qs(c.next_batch(4)) for _ in range(6)]
    first, second = sum(epoch_a[:3], []), sum(epoch_a[3:], [])
    assert sorted(first) == sorted(second) == sorted(r["question"] for r in _records(12))
    assert first != second
    assert a.stats["epoch"] == 2
    unshuffled = _local(path, shuffle=False)
    assert _qs(unshuffled.next_batch(5)) == [f"Compute {i} + 1." for i in range(5)]


def test_restore_gives_the_same_next_batches(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(10))
    src = _local(path, seed=3)
    for _ in range(4):
        src.next_batch(3)  # crosses an epoch boundary
    state = json.loads(json.dumps(src.state()))  # plain ints survive a round trip
    assert all(type(v) is int for v in state.values())
    expected = [_qs(src.next_batch(3)) for _ in range(5)]
    resumed = _local(path, seed=3)
    resumed.restore(state)
    assert [_qs(resumed.next_batch(3)) for _ in range(5)] == expected
    with pytest.raises(ValueError, match="same data settings"):
        _local(path, seed=4).restore(state)


@pytest.mark.parametrize("count", [2, 3])
def test_host_shards_are_disjoint_and_complete(tmp_path, count):
    path = str(os.path.join(FIXTURES, "train_malformed.jsonl"))
    kw = dict(max_prompt_tokens=60, seed=5)
    single = _local(path, **kw)
    hosts = [_local(path, **{**kw, "process_index": h, "process_count": count}) for h in range(count)]
    for _ in range(7):
        parts = [_qs(h.next_batch(2)) for h in hosts]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == _qs(single.next_batch(2 * count))  # host h holds slice h of the global batch
    assert len({json.dumps(h.state(), sort_keys=True) for h in hosts}) == 1


def test_host_shards_cover_an_epoch_exactly_once(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(24))
    hosts = [_local(path, seed=0, process_index=h, process_count=4) for h in range(4)]
    seen = [q for _ in range(3) for h in hosts for q in _qs(h.next_batch(2))]
    assert sorted(seen) == sorted(r["question"] for r in _records(24))


def test_malformed_records_are_skipped_and_counted():
    src = _local(os.path.join(FIXTURES, "train_malformed.jsonl"), max_prompt_tokens=60, shuffle=False)
    batch = src.next_batch(4)
    assert _qs(batch) == ["What is 2 + 3?", "What is 7 * 6?", "What is 9 / 3?", "What is 8 + 8?"]
    assert [e.answer for e in batch] == ["5", "42", "3", "16"]
    stats = src.stats
    assert stats["skipped_missing_answer"] == 3  # absent field, empty string, null
    assert stats["skipped_missing_question"] == 2  # empty question, wrong field name
    assert stats["skipped_prompt_too_long"] == 1
    for e in batch:
        assert e.prompt == e.question + "\n"
        assert list(e.prompt_ids) == TOK(e.prompt)["input_ids"] and len(e.prompt_ids) <= 60


def test_nested_fields_and_gsm8k_answers():
    src = _local(
        os.path.join(FIXTURES, "train_gsm8k_nested.jsonl"),
        question_field="data.q",
        answer_field="solution",
        answer_format="gsm8k",
        shuffle=False,
    )
    batch = src.next_batch(2)
    assert [e.answer for e in batch] == ["7", "1166"]
    assert src.stats["skipped_missing_answer"] == 0
    assert src.next_batch(1)[0].answer == "7"  # the third record is skipped on the way into epoch 1
    assert src.stats["skipped_missing_answer"] == 1


def test_local_parquet_file_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _records(6)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    src = _local(str(tmp_path / "d.parquet"), shuffle=False)
    assert _qs(src.next_batch(6)) == [r["question"] for r in recs]
    glob_src = _local(str(tmp_path / "*.parquet"), shuffle=False)
    assert [e.answer for e in glob_src.next_batch(2)] == ["1", "2"]


def test_saved_dataset_folder_loads(tmp_path):
    import datasets

    datasets.Dataset.from_list(_records(5)).save_to_disk(str(tmp_path / "saved"))
    src = _local(str(tmp_path / "saved"), shuffle=False)
    assert [e.answer for e in src.next_batch(3)] == ["1", "2", "3"]


try:
    import tensorflow_datasets as tfds

    class CapoTinyMath(tfds.core.GeneratorBasedBuilder):
        """A five-record TFDS dataset for the test (built locally in array_record format)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({"question": tfds.features.Text(), "answer": tfds.features.Text()}),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"question": f"Compute {i} * 2.", "answer": str(2 * i)}

except ImportError:  # pragma: no cover - tensorflow-datasets is a runtime requirement
    tfds = None


def test_tfds_registered_dataset_loads_without_tensorflow(tmp_path):
    assert tfds is not None
    CapoTinyMath(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = {"source": "tfds", "path": "capo_tiny_math", "data_dir": str(tmp_path), "process_index": 0, "process_count": 1}
    src = build_source(cfg, TOK)
    batch = src.next_batch(5)
    assert sorted((e.question, e.answer) for e in batch) == [(f"Compute {i} * 2.", str(2 * i)) for i in range(5)]
    assert isinstance(batch[0].question, str)
    with pytest.raises(ValueError, match="array_record"):
        build_source({**cfg, "path": "capo_no_such_dataset"}, TOK)


def test_arithmetic_source_default_and_test_split():
    cfg = {"process_index": 0, "process_count": 1, "world": {"num_test": 20}}
    a, b = build_source(cfg, TOK), build_source(cfg, TOK)
    batch = a.next_batch(8)
    assert batch == b.next_batch(8)
    assert all(e.prompt == e.question + "\n" and e.question.startswith("Compute ") for e in batch)
    other_stream = build_source({**cfg, "seed": 1}, TOK).next_batch(8)
    assert _qs(other_stream) != _qs(batch)
    test = build_source({**cfg, "split": "test", "shuffle": False}, TOK).next_batch(20)
    assert not set(_qs(test)) & set(_qs(a.next_batch(200)))
    state = a.state()
    nxt = a.next_batch(4)
    c = build_source(cfg, TOK)
    c.restore(state)
    assert c.next_batch(4) == nxt


def test_chat_template_prompts():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    src = build_source({"use_chat_template": True, "system_prompt": "Be exact.", "process_index": 0, "process_count": 1}, tok)
    e = src.next_batch(1)[0]
    assert e.prompt == f"<s>system: Be exact.\n<s>user: {e.question}\n\n<s>assistant: "
    assert list(e.prompt_ids).count(tok.bos_token_id) == 3  # no extra bos on top of the template's own
    with pytest.raises(ValueError, match="no chat template"):
        build_source({"use_chat_template": True, "process_index": 0, "process_count": 1}, build_tokenizer())


def test_bad_settings_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data settings \\['sourc'\\]"):
        data_config({"sourc": "hf"})
    with pytest.raises(ValueError, match="needs data.path"):
        data_config({"source": "local"})
    with pytest.raises(ValueError, match="no data files"):
        _local(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="exactly the field"):
        check_template("{prompt}")
    with pytest.raises(ValueError, match="could not load the Hugging Face dataset"):
        build_source({"source": "hf", "path": "no-such-org/no-such-dataset", "process_index": 0, "process_count": 1}, TOK)
    assert set(DEFAULTS["world"]) >= {"min_ops", "max_ops", "max_operand", "ops"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=20))
def test_last_boxed_on_untrusted_text(noise, inner):
    last_boxed(noise)  # never raises
    assert last_boxed(f"{noise} \\boxed{{{inner}}} tail") == inner.strip()
    assert last_boxed(f"\\boxed{{{inner}}} then \\boxed{{\\frac{{1}}{{2}}}}") == "\\frac{1}{2}"
    assert normalize_answer(f"{noise}\n#### {inner}", "gsm8k") == (inner.strip().replace(",", "") or None) or "####" in inner
