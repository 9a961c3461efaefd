"""GenPRMCritic on a tiny random Qwen2 checkpoint with a word-level tokenizer saved beside it.

The model and the sampler are the real ones; `generate` is only wrapped to count what it is given.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from capo_jax.critic import INVALID, CritiqueRequest, parse_outcome_verdict, parse_verdict
from capo_jax.critic import genprm
from capo_jax.critic.genprm import GenPRMCritic, select_devices
from capo_jax.critic.prompt import DEFAULT_OUTCOME_TEMPLATE, DEFAULT_TEMPLATE
from tests.tiny_hf import make_tiny_checkpoint

SPECIALS = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REQUESTS = [
    CritiqueRequest("What is 2 + 3 * 4?", ("3 * 4 = 12.\n\n", "2 + 12 = 14.\n\n", "The answer is 14."), "14"),
    CritiqueRequest("What is 7 - 5?", ("7 - 5 = 3.\n\n", "The answer is 3."), "2"),
    CritiqueRequest("What is 6 / 2?", ("6 / 2 = 3.",), None),
]
M = 4


def _word_tokenizer(chat_template: str | None):
    """A WordLevel tokenizer over the words of the critic templates and the test requests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [DEFAULT_TEMPLATE.system, DEFAULT_TEMPLATE.user, DEFAULT_TEMPLATE.reference_section,
             DEFAULT_OUTCOME_TEMPLATE.system, DEFAULT_OUTCOME_TEMPLATE.user, "system user assistant step solution"]
    texts += [r.question + " " + " ".join(r.steps) + " " + (r.reference or "") for r in REQUESTS]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} | set("0123456789[],:/<>"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=chat_template)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Qwen2 checkpoint whose vocabulary is the word tokenizer's, tokenizer saved with it."""
    tokenizer = _word_tokenizer(CHAT_TEMPLATE)
    path = tmp_path_factory.mktemp("genprm")
    ids = tokenizer.convert_tokens_to_ids
    make_tiny_checkpoint(path, "qwen2", tokenizer=False, vocab_size=len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|pad|>"))
    tokenizer.save_pretrained(path)
    return path


def _config(folder, **kw):
    return {**genprm.DEFAULTS, "path": str(folder), "dtype": "float32", "max_new_tokens": 12,
            "batch_size": 2, **kw}


@pytest.fixture(scope="module")
def critic(folder):
    return GenPRMCritic.from_config(_config(folder, devices="last:2"))


@pytest.fixture
def counted(monkeypatch):
    """Wrap the real `generate` to record (prompt rows, n) of every call."""
    calls: list[tuple[int, int]] = []
    real = genprm.generate

    def wrapper(model, prompts, params, rng, mesh=None, **kw):
        calls.append((len(prompts), params.n))
        return real(model, prompts, params, rng, mesh=mesh, **kw)

    monkeypatch.setattr(genprm, "generate", wrapper)
    return calls


def test_critique_gives_m_texts_from_one_prefill_per_request(critic, counted):
    out = critic.critique(REQUESTS, M, np.random.default_rng(0))
    assert [len(texts) for texts in out] == [M] * len(REQUESTS)
    assert all(isinstance(t, str) for texts in out for t in texts)
    # batch_size=2: two generate calls with 2 + 1 prompt rows, each sampled n=M times.
    assert counted == [(2, M), (1, M)]
    stats = critic.last_stats
    assert stats.prompt_tokens == sum(len(critic.encode(critic_prompt(critic, r))) for r in REQUESTS)
    assert 0 < stats.generated_tokens <= len(REQUESTS) * M * 12
    assert stats.seconds > 0


def critic_prompt(critic, request):
    from capo_jax.critic import render_prompt

    return render_prompt(request.question, request.steps, reference=request.reference, template=critic.template,
                         index_base=critic.index_base, tokenizer=critic.tokenizer)


def test_prompt_goes_through_the_chat_template(critic):
    ids = critic.encode(critic_prompt(critic, REQUESTS[0]))
    assert ids[0] == critic.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert critic.tokenizer.convert_tokens_to_ids("[UNK]") not in ids  # the test vocabulary covers the prompt
    assert critic.tokenizer.convert_tokens_to_ids("<|im_end|>") in critic.stop_tokens


def test_random_critiques_parse_as_invalid_or_a_valid_subset(critic):
    out = critic.critique(REQUESTS, M, np.random.default_rng(1))
    for request, texts in zip(REQUESTS, out):
        for text in texts:
            verdict = parse_verdict(text, len(request.steps), index_base=critic.index_base)
            assert verdict is INVALID or verdict <= frozenset(range(len(request.steps)))


def test_same_rng_seed_gives_same_texts(critic):
    first = critic.critique(REQUESTS[:2], M, np.random.default_rng(5))
    second = critic.critique(REQUESTS[:2], M, np.random.default_rng(5))
    assert first == second
    assert len(set(first[0])) > 1  # temperature 1: the M samples differ


def test_over_budget_and_stepless_requests_get_no_critiques(critic, counted, monkeypatch):
    short = CritiqueRequest("What is 6 / 2?", ("6 / 2 = 3.",))
    long = CritiqueRequest("What is 6 / 2?", ("6 / 2 = 3. " * 60,))
    stepless = CritiqueRequest("What is 6 / 2?", ())
    budget = len(critic.encode(critic_prompt(critic, short)))
    monkeypatch.setattr(critic, "max_prompt_tokens", budget)
    out = critic.critique([long, short, stepless], M, np.random.default_rng(0))
    assert len(out[1]) == M and out[0] == [] and out[2] == []
    assert counted == [(1, M)]
    assert critic.last_stats.prompt_tokens == budget
    # Nothing fits: no generate call at all, and still no exception.
    assert critic.critique([long], M, np.random.default_rng(0)) == [[]]
    assert critic.last_stats.generated_tokens == 0 and len(counted) == 1


def test_critic_on_its_own_device_slice_holds_params_only_there(critic):
    assert len(jax.devices()) == 8
    own = set(jax.devices()[-2:])
    leaves = jax.tree.leaves(nnx.state(critic.model))
    assert leaves
    for leaf in leaves:
        assert set(leaf.sharding.device_set) <= own
    assert set(critic.mesh.devices.flat) == own


def test_judge_outcome_without_chat_template(folder):
    from capo_jax.models import from_pretrained

    model = from_pretrained(folder, dtype="float32")
    plain = _word_tokenizer(None)
    critic = GenPRMCritic(model, plain, max_new_tokens=12, batch_size=4)
    prompt_ids = critic.encode("What is 6 / 2 ?")
    assert plain.convert_tokens_to_ids("<|im_start|>") not in prompt_ids
    out = critic.judge_outcome(REQUESTS, 2, np.random.default_rng(0))
    assert [len(t) for t in out] == [2] * len(REQUESTS)
    for texts in out:
        for text in texts:
            assert parse_outcome_verdict(text) in (INVALID, True, False)


def test_select_devices_specs_and_errors():
    devices = jax.devices()
    assert select_devices("") is None and select_devices(None) is None
    assert select_devices("last:3") == devices[-3:]
    assert select_devices("first:2") == devices[:2]
    assert select_devices("1, 3") == [devices[1], devices[3]]
    assert select_devices([0, 7]) == [devices[0], devices[7]]
    for bad in ("last:0", "last:9", "middle:2", "1,1", "8", "a,b"):
        with pytest.raises(ValueError, match="critic.devices"):
            select_devices(bad)


def test_select_devices_picks_within_each_process():
    """On several processes (a pod: 4 hosts x 4 chips) the option names devices of each host, so the critic's mesh
    spans every host as the policy's does."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Slot:
        id: int
        process_index: int

    pod = [Slot(i, i // 4) for i in range(16)]
    assert [d.id for d in select_devices("last:1", pod)] == [3, 7, 11, 15]
    assert [d.id for d in select_devices("first:2", pod)] == [0, 1, 4, 5, 8, 9, 12, 13]
    assert [d.id for d in select_devices("0,3", pod)] == [0, 3, 4, 7, 8, 11, 12, 15]
    with pytest.raises(ValueError, match="picks within each process's 4 devices"):
        select_devices("last:8", pod)


def test_bad_settings_raise_clear_errors(folder):
    with pytest.raises(ValueError, match="critic.path"):
        GenPRMCritic.from_config(_config(folder / "missing"))
    with pytest.raises(ValueError, match="critic.template"):
        GenPRMCritic.from_config(_config(folder, template="nope"))
    with pytest.raises(ValueError, match="critic.top_p"):
        GenPRMCritic.from_config(_config(folder, top_p=0.0))


def test_trainer_builds_the_genprm_backend_from_the_config_schema(folder):
    from capo_jax.config import get_default_config
    from capo_jax.rl.loop import make_critic

    config = get_default_config()
    for key, default in genprm.DEFAULTS.items():  # the schema lists each field with the backend's own default
        assert key in config.critic, f"config schema lacks critic.{key}"
        value = config.critic[key]
        assert (value.to_dict() if hasattr(value, "to_dict") else value) == default, (key, value, default)
    config.critic.path = str(folder)
    config.critic.dtype = "float32"
    config.critic.devices = "first:2"
    critic = make_critic(config)
    assert isinstance(critic, GenPRMCritic)
    assert set(critic.mesh.devices.flat) == set(jax.devices()[:2])
    assert critic.max_new_tokens == config.critic.max_new_tokens and critic.index_base == config.critic.index_base
