"""The CAPO-vs-GRPO comparison: critic precision/recall, the table builder, the plots (no trainer runs here)."""
from __future__ import annotations

import json
import math
import os
import struct

import pytest

from capo_jax.critic import INVALID
from capo_jax.demo.compare import (build_table, check_extra, link_bootstrap, mean_std, parse_cli, precision_recall,
                                   run_command, summarize_run, vote)
from capo_jax.demo.plot import plot_comparison, plot_run
from capo_jax.metrics import read_jsonl, read_metrics

F = frozenset


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_vote_on_the_papers_example():
    lists = [F({1, 3}), F({1, 2, 3}), F({1, 3}), F({2, 3})]
    assert vote(lists, "majority") == F({1, 3})
    assert vote(lists, "intersection") == F({3})
    assert vote(lists, "union") == F({1, 2, 3})
    assert vote([INVALID, F({2}), INVALID], "intersection") == F({2})  # M' = 1
    assert vote([INVALID, INVALID], "union") is None
    with pytest.raises(ValueError):
        vote(lists, "average")


def test_precision_recall_against_hand_computed_values():
    truths = [F({1}), F(), F({0, 1})]
    num_steps = [3, 2, 2]
    verdicts = [
        [F({1}), F({1, 2}), F({1}), F({2})],  # A: single tp3 fp2 fn1; intersection {}; majority {1}; union {1, 2}
        [F({0}), F(), INVALID, F()],  # B: single fp1; M'=3: intersection {}, majority {} (1 of 3), union {0}
        [INVALID] * 4,  # C: no valid critique: flags nothing, so votes miss both wrong steps
    ]
    pr = precision_recall(truths, verdicts, num_steps)
    s = pr["single"]
    assert (s["tp"], s["fp"], s["fn"]) == (3, 3, 1)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.75)
    assert s["f1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    i = pr["intersection"]
    assert (i["tp"], i["fp"], i["fn"]) == (0, 0, 3) and math.isnan(i["precision"]) and i["recall"] == 0.0
    m = pr["majority"]
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 2)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1 / 3)
    u = pr["union"]
    assert (u["tp"], u["fp"], u["fn"]) == (1, 2, 2)
    assert u["precision"] == pytest.approx(1 / 3) and u["recall"] == pytest.approx(1 / 3)
    assert pr["base_rate"] == pytest.approx(3 / 7)
    assert (pr["responses"], pr["steps"], pr["critiques"], pr["invalid_critiques"]) == (3, 7, 12, 5)
    assert pr["responses_without_valid_critique"] == 1


def test_precision_recall_ignores_out_of_range_steps_and_checks_lengths():
    pr = precision_recall([F({0, 5})], [[F({0, 7})]], [2])
    assert (pr["single"]["tp"], pr["single"]["fp"], pr["single"]["fn"]) == (1, 0, 0)
    with pytest.raises(ValueError):
        precision_recall([F()], [], [1])


def _write_metrics(workdir, rows) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_plot_run_writes_a_png_and_skips_missing_keys(tmp_path):
    rows = []
    for step in range(1, 7):
        row = {"step": step, "time": 0.0, "reward/outcome_accuracy": 0.1 * step, "reward/frac_tokens_penalized": 0.05}
        if step % 3 == 0:
            row.update({"eval/accuracy": 0.2 + 0.01 * step, "eval/step_error_rate": 0.3 - 0.01 * step})
        rows.append(row)  # no reward/mean at all: that panel is skipped
    _write_metrics(str(tmp_path), rows)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "reward/outcome_acc')  # a line cut short by a killed run is ignored
    out = plot_run(str(tmp_path))
    assert out == os.path.join(str(tmp_path), "curves.png")
    w, h = _png_size(out)
    assert w > 100 and h > 100
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="metrics.jsonl:7: not a JSON line"):
        read_jsonl(str(tmp_path))  # the strict reader (tests, notebooks) names the cut line instead

    bare = tmp_path / "bare"
    _write_metrics(str(bare), [{"step": 1, "something/else": 1.0}])
    _png_size(plot_run(str(bare), str(tmp_path / "bare.png")))
    with pytest.raises(FileNotFoundError):
        plot_run(str(tmp_path / "missing"))


def _run(evals, train=(0.1, 0.2)):
    rows = [{"step": s + 1, "reward/outcome_accuracy": a} for s, a in enumerate(train)]
    for step, acc, wrong in evals:
        while len(rows) < step:
            rows.append({"step": len(rows) + 1, "reward/outcome_accuracy": train[-1]})
        rows[step - 1].update({"eval/accuracy": acc, "eval/step_error_rate": wrong})
    return rows


def test_table_builder_means_and_threshold_steps(tmp_path):
    threshold = 0.35
    specs = [
        ("capo", 0, [(5, 0.2, 0.3), (10, 0.4, 0.1)]),
        ("capo", 1, [(5, 0.35, 0.2), (10, 0.5, 0.2)]),
        ("grpo", 0, [(5, 0.1, 0.4), (10, 0.2, 0.3)]),
    ]
    runs = []
    for mode, seed, evals in specs:
        r = {"mode": mode, "seed": seed, "ok": True, "status": "ok", "seconds": 12.0}
        r.update(summarize_run(_run(evals), threshold))
        runs.append(r)
    runs.append({"mode": "grpo", "seed": 1, "ok": False, "status": "failed (exit 1)", "seconds": 3.0})
    assert runs[0]["steps_to_threshold"] == 10 and runs[1]["steps_to_threshold"] == 5
    assert runs[2]["steps_to_threshold"] is None
    assert runs[0]["eval_steps"] == [5, 10] and runs[0]["eval_wrong_step_frac"] == [0.3, 0.1]
    assert runs[0]["final_train_accuracy"] == pytest.approx(0.2)  # steps 6..10 all at 0.2

    table, summary = build_table(runs, threshold, ["capo", "grpo"])
    capo, grpo = summary["capo"], summary["grpo"]
    assert capo["final_eval_accuracy"][0] == pytest.approx(0.45)
    assert capo["final_eval_accuracy"][1] == pytest.approx(math.sqrt(2 * 0.05 ** 2))  # sample std, ddof=1
    assert capo["final_wrong_step_frac"][0] == pytest.approx(0.15)
    assert capo["steps_to_threshold"][0] == pytest.approx(7.5) and capo["reached_threshold"] == 2
    assert (grpo["ok"], grpo["runs"]) == (1, 2) and grpo["failed"] == [{"seed": 1, "status": "failed (exit 1)"}]
    assert grpo["final_eval_accuracy"] == (pytest.approx(0.2), None) and grpo["reached_threshold"] == 0
    assert capo["mean_eval_accuracy"][0] == pytest.approx((0.3 + 0.425) / 2)
    assert runs[1]["best_eval_accuracy"] == pytest.approx(0.5)
    assert "| capo | 2/2 | 0.450 ± 0.071 | 0.150 ± 0.071 | 7.5 ± 3.5 (2/2 reached) | 0.363 ± 0.088 | 0.200 ± 0.000 |" in table
    assert "| grpo | 1/2 | 0.200 | 0.300 | never | 0.150 | 0.200 |" in table
    assert "| grpo_s1 | failed (exit 1) |" in table

    results = {"runs": runs, "bootstrap_eval": {"accuracy": 0.15, "step_error_rate": 0.35}, "threshold": threshold}
    w, h = _png_size(plot_comparison(results, str(tmp_path / "compare.png")))
    assert w > 300 and h > 100


def test_mean_std_and_command_line(tmp_path):
    assert mean_std([]) == (None, None)
    assert mean_std([1.0]) == (1.0, None)
    assert mean_std([1.0, 3.0])[1] == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError):
        check_extra(["--config.seed=3"])
    with pytest.raises(ValueError):
        check_extra(["--workdir", "x"])
    check_extra(["--config.optim.learning_rate=1e-4"])
    args = parse_cli(["--seeds", "0,1", "--steps", "7", "--extra", "--config.optim.learning_rate=1e-4"])
    assert args.seed_list == [0, 1] and args.mode_list == ["capo", "grpo"] and args.extra == ["--config.optim.learning_rate=1e-4"]
    cmd = run_command("configs/demo.py", "grpo", 1, "/o/grpo_s1", 7, 5, args.extra)
    assert cmd[1:3] == ["-m", "capo_jax.train"]
    assert cmd[-4:] == ["--config.reward.mode=grpo", "--config.seed=1", "--config.workdir=/o/grpo_s1",
                        "--config.total_steps=7"]
    shared = tmp_path / "bootstrap"
    shared.mkdir()
    link_bootstrap(str(shared), str(tmp_path / "capo_s0"))
    link_bootstrap(str(shared), str(tmp_path / "capo_s0"))  # idempotent
    assert os.path.realpath(tmp_path / "capo_s0" / "bootstrap") == os.path.realpath(shared)
