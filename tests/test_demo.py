"""The README's first command, at test size: `python -m capo_jax.train --config configs/demo.py` end to end.

Bootstrap from scratch, CAPO steps with the rule critic, held-out evaluation, checkpoint, Hugging Face
export and the curve plot, all through the real CLI entry point with small sizes.
"""
import json
import os

import numpy as np
import pytest

from capo_jax import train

TINY = [
    "--config.total_steps=2",
    "--config.demo.model.hidden_size=32",
    "--config.demo.model.intermediate_size=64",
    "--config.demo.model.num_layers=1",
    "--config.demo.sft.steps=30",
    "--config.demo.sft.batch_size=16",
    "--config.demo.sft.num_eval=8",
    "--config.rollout.prompts_per_step=2",
    "--config.rollout.group_size=4",
    "--config.rl.micro_batch_size=8",  # 8 rows over the 8 simulated devices
    "--config.rl.num_minibatches=1",
    "--config.eval.every=2",
    "--config.eval.num_problems=8",
    "--config.eval.samples=2",
    "--config.checkpoint.async_save=false",
]


def test_demo_config_runs_end_to_end(tmp_path):
    workdir = str(tmp_path / "demo")
    status = train.main(["--config", "configs/demo.py", f"--config.workdir={workdir}", *TINY])
    assert status == 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the bootstrapped policy's evaluation, before any update
    for row in (rows[0], rows[2]):
        assert row["eval/sampled_pairs"] == 16 and row["eval/greedy_pairs"] == 8 and row["eval/problems"] == 8
        for key in ("eval/sampled_accuracy", "eval/greedy_accuracy", "eval/sampled_step_error_rate"):
            assert 0.0 <= row[key] <= 1.0, key
        acc = row["eval/sampled_accuracy"]
        assert row["eval/sampled_accuracy_se"] == pytest.approx(np.sqrt(acc * (1 - acc) / 16))
    last = rows[-1]
    for key in ("reward/outcome_accuracy", "steps/per_response", "critic/parse_failure_rate", "train/loss"):
        assert key in last and np.isfinite(last[key]), key
    assert last["critic/parse_failure_rate"] == 0.0  # the rule critic always writes a parseable verdict
    assert any(k.startswith("eval/") for k in last), sorted(last)
    # end-of-run outputs: Hugging Face export that transformers loads, and the PNG of the curves
    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "hf_export"))
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(workdir, "hf_export"))
    assert model.config.hidden_size == 32 and len(tok("1 + 2")["input_ids"]) > 0
    # the orbax checkpoint exports through the CLI to the same weights
    from capo_jax import export

    assert export.main(["--workdir", workdir, "--out", str(tmp_path / "exported")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    # the same command again resumes and has nothing left to do
    assert train.main(["--config", "configs/demo.py", f"--config.workdir={workdir}", *TINY]) == 0
    assert len(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()) == 3
