"""The CAPO-vs-GRPO comparison: critic precision/recall, per-run numbers, the report, the grid, the plots (no trainer runs)."""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
from scipy import stats as sps

from capo_jax.critic import INVALID
from capo_jax.demo.compare import (Variant, build_report, check_extra, load_config, make_variants, parse_cli, parse_seeds,
                                   precision_recall, resolve_config_path, run_command, summarize_run, vote)
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
    rows = [{"step": 0, "eval/sampled_accuracy": 0.3, "eval/sampled_accuracy_se": 0.02, "eval/greedy_accuracy": 0.8}]
    for step in range(1, 7):
        row = {"step": step, "time": 0.0, "reward/outcome_accuracy": 0.1 * step, "reward/frac_tokens_penalized": 0.05}
        if step % 3 == 0:
            row.update({"eval/sampled_accuracy": 0.3 + 0.01 * step, "eval/sampled_step_error_rate": 0.3 - 0.01 * step})
        rows.append(row)  # no reward/mean at all: that panel is skipped
    _write_metrics(str(tmp_path), rows)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "reward/outcome_acc')  # a line cut short by a killed run is ignored
    out = plot_run(str(tmp_path))
    assert out == os.path.join(str(tmp_path), "curves.png")
    w, h = _png_size(out)
    assert w > 100 and h > 100
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="metrics.jsonl:8: not a JSON line"):
        read_jsonl(str(tmp_path))  # the strict reader (tests, notebooks) names the cut line instead

    bare = tmp_path / "bare"
    _write_metrics(str(bare), [{"step": 1, "something/else": 1.0}])
    _png_size(plot_run(str(bare), str(tmp_path / "bare.png")))
    with pytest.raises(FileNotFoundError):
        plot_run(str(tmp_path / "missing"))


def _rows(evals, rewards=(0.5, 0.7)):
    """Metrics rows: (step, sampled acc, greedy acc, wrong-step rate) evaluations, per-step rewards from step 1."""
    rows = {s + 1: {"step": s + 1, "reward/outcome_accuracy": r} for s, r in enumerate(rewards)}
    for step, acc, greedy, wrong in evals:
        rows.setdefault(step, {"step": step}).update({"eval/sampled_accuracy": acc, "eval/greedy_accuracy": greedy,
                                                      "eval/sampled_step_error_rate": wrong})
    return [rows[k] for k in sorted(rows)]


def test_summarize_run_gain_auc_and_steps_to_threshold():
    r = summarize_run(_rows([(0, 0.3, 0.8, 0.3), (10, 0.5, 0.82, 0.2), (20, 0.6, 0.85, 0.1)]), threshold=0.45)
    assert r["start"] == 0.3 and r["final"] == 0.6 and r["gain"] == pytest.approx(0.3)
    assert r["auc"] == pytest.approx(((0.3 + 0.5) / 2 * 10 + (0.5 + 0.6) / 2 * 10) / 20)
    assert r["steps_to_threshold"] == 10 and r["final_wrong"] == 0.1 and r["final_greedy"] == 0.85
    assert r["eval_steps"] == [0, 10, 20] and r["train_accuracy"] == [0.5, 0.7]
    never = summarize_run(_rows([(0, 0.3, 0.8, 0.3), (10, 0.31, 0.8, 0.3)]), threshold=0.45)
    assert never["steps_to_threshold"] is None
    no_start = summarize_run(_rows([(10, 0.5, 0.8, 0.2)]), threshold=None)
    assert no_start["start"] is None and no_start["gain"] is None and no_start["auc"] is None


def test_report_pairs_capo_with_grpo_by_seed(tmp_path):
    finals = {("capo", 0): 0.6, ("capo", 1): 0.65, ("capo", 2): 0.62, ("grpo", 0): 0.55, ("grpo", 1): 0.58}
    runs = []
    for (mode, seed), final in finals.items():
        r = {"variant": "base", "mode": mode, "seed": seed, "ok": True, "status": "ok", "seconds": 10.0}
        r.update(summarize_run(_rows([(0, 0.3, 0.8, 0.3), (10, final, 0.8, 0.2)]), threshold=0.4))
        runs.append(r)
    runs.append({"variant": "base", "mode": "grpo", "seed": 2, "ok": False, "status": "failed (exit 1)", "seconds": 1.0})
    table, summary = build_report(runs, [Variant("base", (), ("capo", "grpo"))], 0.4, 0.1)
    capo = summary["variants"]["base"]["capo"]
    assert capo["ok"] == 3 and capo["final"]["mean"] == pytest.approx(np.mean([0.6, 0.65, 0.62]))
    assert summary["variants"]["base"]["grpo"]["failed"] == [{"seed": 2, "status": "failed (exit 1)"}]
    diff = summary["paired"]["capo - grpo"]["final"]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(((0.6 - 0.55) + (0.65 - 0.58)) / 2)
    assert diff["p"] == pytest.approx(sps.ttest_rel([0.6, 0.65], [0.55, 0.58]).pvalue)
    assert "| capo | 3/3 | 0.300 [0.300, 0.300] |" in table and "| grpo_s2 | failed (exit 1) |" in table
    assert "10.0 [10.0, 10.0] (3/3 reached)" in table
    groups = {m: [r for r in runs if r["mode"] == m and r["ok"]] for m in ("capo", "grpo")}
    w, h = _png_size(plot_comparison(groups, str(tmp_path / "compare.png"), title="t"))
    assert w > 300 and h > 100


def test_grid_variants_seeds_and_command_line():
    config = load_config(resolve_config_path("configs/demo.py"), [])
    variants = make_variants(["critic.misjudge_prob=0,0.1,0.3", "critic.vote=majority"], ["capo", "grpo"], config)
    assert [v.name for v in variants] == ["base", "critic.misjudge_prob=0", "critic.misjudge_prob=0.3", "critic.vote=majority"]
    assert variants[0].modes == ("capo", "grpo") and variants[1].modes == ("capo",)  # GRPO ignores the critic
    assert variants[1].overrides == (("critic.misjudge_prob", "0"),)
    for bad in (["critic.misjudge_prob"], ["critic.nope=1"], ["seed=1,2"], ["critic.vote=sometimes"]):
        with pytest.raises(ValueError):
            make_variants(bad, ["capo"], config)
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7] and parse_seeds("2,1") == [1, 2]
    with pytest.raises(ValueError):
        check_extra(["--config.seed=3"])
    with pytest.raises(ValueError):
        check_extra(["--config.data.seed=3"])
    with pytest.raises(ValueError):
        check_extra(["--workdir", "x"])
    check_extra(["--config.optim.learning_rate=1e-4"])
    args = parse_cli(["--steps", "7", "--grid", "critic.vote=union", "--extra", "--config.optim.learning_rate=1e-4"])
    assert args.seed_list == list(range(8)) and args.mode_list == ["capo", "grpo"] and args.grid == ["critic.vote=union"]
    cmd = run_command("configs/demo.py", "capo", 1, "/o/capo_s1", 7, 5, args.extra, (("critic.vote", "union"),))
    assert cmd[1:3] == ["-m", "capo_jax.train"] and "--config.critic.vote=union" in cmd
    assert cmd[-5:] == ["--config.reward.mode=capo", "--config.seed=1", "--config.data.seed=1",
                        "--config.workdir=/o/capo_s1", "--config.total_steps=7"]
