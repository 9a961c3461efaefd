"""Evaluation: the benchmark registry on fixture files, the unbiased pass@k, scoring fixed responses, and the CLI."""
from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_jax.data.benchmarks import REGISTRY, get_benchmark, load_benchmark
from capo_jax.evaluate import ks_for, main, pass_at_k, score_benchmark

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BENCH_DIR = os.path.join(FIXTURES, "benchmarks")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_the_combinatorial_definition(nck):
    n, c, k = nck
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # P(some of k draws without replacement is correct)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edges_and_k_values():
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    assert ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(3, 4, 1)


def test_every_registered_benchmark_loads_from_its_fixture():
    expected = {
        "math500": ["\\frac{3}{4}", "25", "5", "4"],
        "gsm8k": ["12", "1250", "3"],
        "aime24": ["24", "1001"],
        "amc23": ["10", "42"],
        "arc_challenge": ["B", "B"],
        "mmlu_pro": ["B", "C"],
    }
    assert set(REGISTRY) == set(expected) | {"gpqa_diamond"}
    for name, refs in expected.items():
        bench, items, _ = load_benchmark(name, data_dir=BENCH_DIR)
        assert [it.reference for it in items] == refs, name
    _, arc, skipped = load_benchmark("ARC-Challenge", data_dir=BENCH_DIR)
    assert skipped == 1  # its answer key is not one of its labels
    assert arc[1].question.endswith("A. steam\nB. ice\nC. fog")
    _, mmlu, _ = load_benchmark("mmlu_pro", data_dir=BENCH_DIR)
    assert mmlu[0].question.count("\n") == 11 and "J. 12" in mmlu[0].question
    assert "E." not in mmlu[1].question  # trailing N/A padding dropped


def test_gpqa_options_are_shuffled_reproducibly_and_the_key_follows():
    _, a, _ = load_benchmark("gpqa_diamond", data_dir=BENCH_DIR)
    _, b, _ = load_benchmark("gpqa_diamond", data_dir=BENCH_DIR)
    assert a == b
    for item, correct in zip(a, ["negative", "neutron"]):
        line = [ln for ln in item.question.splitlines() if ln.endswith(". " + correct)]
        assert len(line) == 1 and line[0][0] == item.reference
    assert {it.reference for it in a} != {"A"}  # not always first


def test_scoring_fixed_responses_gives_the_known_accuracy():
    bench, items, _ = load_benchmark("math500", data_dir=BENCH_DIR)
    greedy = ["so \\boxed{\\frac{3}{4}}", "The answer is \\boxed{24}", "x = \\boxed{5}", "no answer"]
    samples = [["\\boxed{3/4}", "\\boxed{1}", "\\boxed{0.75}"], ["\\boxed{25}"] * 3, ["\\boxed{4}"] * 3, ["\\boxed{4}", "\\boxed{2}", "?"]]
    r = score_benchmark(bench, items, greedy, samples)
    assert r["greedy_correct"] == [1, 0, 1, 0] and r["pass@1_greedy"] == 0.5
    assert r["sample_correct_counts"] == [2, 3, 0, 1]
    assert r["avg@3"] == pytest.approx(6 / 12)
    assert r["pass@1"] == pytest.approx(6 / 12)
    assert r["pass@2"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    assert r["pass@3"] == pytest.approx(3 / 4)
    bench, items, _ = load_benchmark("mmlu_pro", data_dir=BENCH_DIR)
    r = score_benchmark(bench, items, ["The answer is \\boxed{B}", "I pick (D)."], None)
    assert r["greedy_correct"] == [1, 0]
    bench, items, _ = load_benchmark("gsm8k", data_dir=BENCH_DIR)
    r = score_benchmark(bench, items, ["#### 12", "\\boxed{1,250}", "\\boxed{4}"], None)
    assert r["greedy_correct"] == [1, 1, 0]


def test_unknown_benchmark_and_missing_data_raise():
    with pytest.raises(ValueError, match="unknown benchmark 'math501'"):
        get_benchmark("math501")
    with pytest.raises(ValueError, match="hub is unreachable"):
        load_benchmark("aime24", data_dir=FIXTURES)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random-weight policy with the demo tokenizer, saved as a Hugging Face folder."""
    from flax import nnx

    from capo_jax.demo.bootstrap import _model_config
    from capo_jax.data.tokenizer import save_tokenizer
    from capo_jax.models import Transformer, save_pretrained

    out = str(tmp_path_factory.mktemp("tiny_policy"))
    tok = save_tokenizer(out)
    cfg = _model_config({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                         "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 128, "rope_theta": 1e4}, tok)
    save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), out)
    return out


def test_cli_end_to_end_on_a_fixture_file(tiny_model, tmp_path):
    from capo_jax.rewards.verify import score

    out = tmp_path / "res.json"
    argv = ["--model", tiny_model, "--benchmarks", "file:" + os.path.join(FIXTURES, "arithmetic_eval.jsonl"),
            "--template", "{question}\n", "--max_new_tokens", "12", "--num_samples", "3", "--batch_size", "8",
            "--output", str(out), "--save_responses"]
    report = main(argv)
    on_disk = json.loads(out.read_text())
    r = on_disk["results"]["arithmetic_eval"]
    assert r["num_items"] == 6 and r["num_samples"] == 3
    assert set(r) >= {"pass@1_greedy", "avg@3", "pass@1", "pass@2", "pass@3"}
    rows = on_disk["responses"]["arithmetic_eval"]
    refs = [row["reference"] for row in rows]
    assert refs == [json.loads(line)["answer"] for line in open(os.path.join(FIXTURES, "arithmetic_eval.jsonl"))]
    rescored = score([row["greedy"] for row in rows], refs)
    assert r["pass@1_greedy"] == pytest.approx(float(rescored.mean()))
    assert all(len(row["samples"]) == 3 for row in rows)


def test_cli_reads_a_training_workdir_like_its_hf_folder(tiny_model, tmp_path):
    import optax
    from flax import nnx

    from capo_jax import checkpoint as ckpt_lib
    from capo_jax.config import get_default_config
    from capo_jax.models import from_pretrained

    model = from_pretrained(tiny_model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    work = str(tmp_path / "work")
    ckpt_lib.save_run_files(work, get_default_config().to_dict(), tiny_model, model.config.to_hf())
    ck = ckpt_lib.Checkpointer(work, async_save=False)
    ck.save(5, params, optax.sgd(0.1).init(params), {"step": 5})
    ck.close()
    common = ["--benchmarks", "file:" + os.path.join(FIXTURES, "arithmetic_eval.jsonl"), "--template", "{question}\n",
              "--max_new_tokens", "12", "--batch_size", "8", "--output", "", "--save_responses"]
    from_work = main(["--model", work] + common)
    from_hf = main(["--model", tiny_model] + common)
    assert from_work["step"] == 5 and from_hf["step"] is None
    assert from_work["responses"] == from_hf["responses"]  # and greedy decoding is deterministic


def test_cli_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="neither config.json"):
        main(["--model", str(tmp_path), "--benchmarks", "gsm8k", "--data_dir", BENCH_DIR, "--output", ""])


# ---------------------------------------------------------------------------------------------
# The arithmetic benchmark, settings from a training workdir, templates typed in a shell


def test_arithmetic_benchmark_is_the_world_test_split_and_the_verifier_scores_its_solutions():
    from capo_jax.data.arithmetic import ArithmeticWorld
    from capo_jax.data.benchmarks import ARITHMETIC

    world = {"seed": 3, "num_test": 12, "max_ops": 3}
    bench, items, skipped = load_benchmark("arithmetic", world=world)
    tests = ArithmeticWorld(world).test_set()
    assert bench.name == ARITHMETIC and skipped == 0 and bench.template == "{question}\n"
    assert [(it.question, it.reference) for it in items] == [(p.question, p.answer) for p in tests]
    assert len(load_benchmark("arithmetic", world=world, limit=5)[1]) == 5
    assert [it.question for it in load_benchmark("arithmetic")[1]] == [p.question for p in ArithmeticWorld().test_set()]
    right = score_benchmark(bench, items, [p.solution for p in tests], None)
    wrong = score_benchmark(bench, items, [p.solution_with([v + 1 for v in p.values]) for p in tests], None)
    assert right["pass@1_greedy"] == 1.0 and wrong["pass@1_greedy"] == 0.0


def _workdir(tiny_model, path, **data):
    import optax
    from flax import nnx

    from capo_jax import checkpoint as ckpt_lib
    from capo_jax.config import get_default_config
    from capo_jax.models import from_pretrained

    cfg = get_default_config()
    cfg.data.world.seed, cfg.data.world.num_test = 4, 5
    cfg.eval.max_new_tokens = 6
    for key, value in data.items():
        cfg.data[key] = value
    model = from_pretrained(tiny_model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckpt_lib.save_run_files(str(path), cfg.to_dict(), tiny_model, model.config.to_hf())
    ck = ckpt_lib.Checkpointer(str(path), async_save=False)
    ck.save(1, params, optax.sgd(0.1).init(params), {"step": 1})
    ck.close()
    return str(path)


def test_a_workdir_brings_its_world_template_and_budget(tiny_model, tmp_path, capsys):
    from capo_jax.data.arithmetic import ArithmeticWorld

    work = _workdir(tiny_model, tmp_path / "work", template="Q: {question}\nA:")
    report = main(["--model", work, "--benchmarks", "arithmetic", "--output", "", "--save_responses", "--batch_size", "8"])
    r = report["results"]["arithmetic"]
    assert r["template"] == "Q: {question}\nA:" and r["max_new_tokens"] == 6 and r["use_chat_template"] is False
    questions = [row["question"] for row in report["responses"]["arithmetic"]]
    assert questions == [p.question for p in ArithmeticWorld({"seed": 4, "num_test": 5}).test_set()]
    assert "come from" in capsys.readouterr().out
    # a command-line template wins, with its escapes read as a shell passes them (backslash, n)
    report = main(["--model", work, "--benchmarks", "arithmetic", "--output", "", "--template", "{question}\\n",
                   "--max_new_tokens", "4", "--batch_size", "8"])
    r = report["results"]["arithmetic"]
    assert r["template"] == "{question}\n" and r["max_new_tokens"] == 4
    assert "literal backslash-n" not in capsys.readouterr().err

    from capo_jax.evaluate import _parser, prompt_settings

    chat = {"data": {"use_chat_template": True, "system_prompt": "Be brief."}}
    assert prompt_settings(_parser().parse_args(["--model", "m"]), chat).use_chat_template is True
    off = prompt_settings(_parser().parse_args(["--model", "m", "--no-use_chat_template", "--system_prompt", ""]), chat)
    assert off.use_chat_template is False and off.system_prompt == ""
    assert prompt_settings(_parser().parse_args(["--model", "m"]), None).max_new_tokens == 1024


def test_a_runs_math_template_stays_off_multiple_choice_benchmarks():
    from capo_jax.data.benchmarks import REGISTRY
    from capo_jax.evaluate import _parser, benchmark_template, prompt_settings

    run = {"data": {"template": "{question}\nBox the answer."}, "reward": {"answer_format": "math"}}
    inherited = prompt_settings(_parser().parse_args(["--model", "m"]), run)
    choice = next(b for b in REGISTRY.values() if b.answer_format == "choice")
    math = next(b for b in REGISTRY.values() if b.answer_format == "math")
    assert benchmark_template(inherited, math) == "{question}\nBox the answer."
    assert benchmark_template(inherited, choice) == choice.template and choice.template != inherited.template
    typed = prompt_settings(_parser().parse_args(["--model", "m", "--template", "Q: {question}"]), run)
    assert benchmark_template(typed, choice) == "Q: {question}"  # typed on the command line: the user's choice


def test_a_template_still_holding_a_literal_backslash_n_warns(tiny_model, tmp_path, capsys):
    report = main(["--model", tiny_model, "--benchmarks", "arithmetic", "--limit", "2", "--output", "",
                   "--template", "{question}\\\\n", "--max_new_tokens", "2"])  # typed \\n: a literal backslash-n
    assert report["results"]["arithmetic"]["template"] == "{question}\\n"
    err = capsys.readouterr().err
    assert "warning" in err and "literal backslash-n" in err


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab{}\\\nt\tnqé ")), max_size=30))
def test_read_escapes_inverts_shell_escaping(text):
    """Writing backslashes as \\\\, newlines as \\n and tabs as \\t (what a user types) reads back to the text."""
    from capo_jax.data.templates import read_escapes

    typed = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    if "\t" in text and any(typed[i:i + 2] == "\\t" and typed[i + 2:i + 3].islower() for i in range(len(typed))):
        return  # \t before a lower-case letter is kept for LaTeX (\text, \times): not invertible, by design
    assert read_escapes(typed) == text


def test_read_escapes_keeps_latex():
    from capo_jax.data.templates import MATH_TEMPLATE, literal_newline_warning, read_escapes

    assert read_escapes(MATH_TEMPLATE) == MATH_TEMPLATE
    assert read_escapes("{question}\\nUse \\text{x}, \\times, \\frac{a}{b} and \\boxed{{}}.") == \
        "{question}\nUse \\text{x}, \\times, \\frac{a}{b} and \\boxed{{}}."
    assert read_escapes("a\\t1\\tB") == "a\t1\tB" and read_escapes("\\tb") == "\\tb"
    assert read_escapes("no escapes") == "no escapes"
    assert literal_newline_warning("{question}\n") is None and literal_newline_warning("{question}\\n")
