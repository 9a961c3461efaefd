"""`python -m capo_jax.demo.compare`: CAPO vs GRPO on the arithmetic demo over seeds, and a sweep of critic settings.

    python -m capo_jax.demo.compare [--seeds 0-7] [--steps N] [--modes capo,grpo] [--out DIR] [--eval-every K]
                                    [--grid critic.misjudge_prob=0,0.1,0.3] [--grid critic.vote=...] [--fresh]
                                    [--extra --config.key=value ...]

Every (mode, seed) run is `python -m capo_jax.train --config configs/demo.py` in a subprocess, one after
the other, with `seed` and `data.seed` set to the seed: a seed changes the prompt order, the rollouts
and the critic's noise. All runs start from one shared bootstrap (the demo policy for these settings in
the bootstrap cache, trained once up front), which each run evaluates at step 0. A finished run found
in its workdir is reused; an unfinished one resumes. Per mode the report gives, as means with 95%
Student-t intervals over seeds: the sampled held-out accuracy at the end, its gain over step 0, the area
under the accuracy curve (the mean accuracy over the run), the first step reaching the bootstrap's
accuracy + `--delta`, the final true wrong-step rate and greedy accuracy; then the paired difference
CAPO - GRPO per metric with its interval and paired t-test p-value. Each `--grid KEY=V1,V2,..` adds a
variant per value (critic settings only change the modes that use the critic, so GRPO runs once per seed
and every variant is paired with it). It writes `<out>/compare.md`, `compare.json`, `compare.png` (mean
curves with 95% bands) and, with a grid, `sweep.png`; and the rule critic's step-level precision and recall
(one critique and each vote of M) on responses the bootstrap samples, per `critic.misjudge_prob` in the grid.
`--extra` must come last: everything after it goes to every run (and to the bootstrap's settings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from capo_jax.demo.plot import plot_comparison, series
from capo_jax.demo.stats import fmt_ci, fmt_p, mean_ci, paired_difference
from capo_jax.metrics import read_metrics

VOTES = ("intersection", "majority", "union")
RESERVED_KEYS = ("reward.mode", "seed", "data.seed", "workdir", "total_steps", "eval.every")  # set per run here
KNOWN_MODES = ("capo", "grpo", "genorm")
CRITIC_FREE_MODES = ("grpo",)  # modes whose runs do not depend on critic.* settings

# ---------------------------------------------------------------------------------------------
# Critic precision / recall


def vote(verdicts: Sequence[Any], mode: str) -> frozenset[int] | None:
    """The voted wrong-step set of one response's M verdicts (INVALID ones dropped); None when none parsed.
    The rule is the trainer's own (`capo_jax.rewards.credit.step_weights`), applied to this one response."""
    from capo_jax.critic import INVALID
    from capo_jax.rewards.credit import step_weights, votes_from_verdicts

    if mode not in VOTES:
        raise ValueError(f"vote mode {mode!r}: use one of {VOTES}")
    valid = [v for v in verdicts if v is not INVALID]
    if not valid:
        return None
    width = 1 + max((max(v) for v in valid if v), default=0)
    votes, ok = votes_from_verdicts([list(verdicts)], 1, len(verdicts), width)
    flagged = np.asarray(step_weights(votes, ok, mode)[0][0]) > 0
    return frozenset(int(s) for s in np.flatnonzero(flagged))


def _pr(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * p * r / (p + r) if tp else (0.0 if (tp + fp) and (tp + fn) else float("nan"))
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def precision_recall(truths: Sequence[frozenset[int]], verdicts: Sequence[Sequence[Any]],
                     num_steps: Sequence[int]) -> dict[str, Any]:
    """Step-level precision / recall of the critic against the true wrong steps, micro-averaged over (response, step).

    `truths[i]`: the true wrong steps (0-based) of response i; `verdicts[i]`: its M parsed verdicts
    (frozensets, or INVALID); `num_steps[i]`: its step count (indices outside it are ignored).
    `single` counts every valid critique as its own prediction; `intersection` / `majority` /
    `union` vote the M critiques of a response first (a response with no valid critique flags nothing).
    """
    from capo_jax.critic import INVALID

    if not (len(truths) == len(verdicts) == len(num_steps)):
        raise ValueError(f"truths, verdicts and num_steps differ in length: {len(truths)}, {len(verdicts)}, {len(num_steps)}")
    single = [0, 0, 0]
    voted = {m: [0, 0, 0] for m in VOTES}
    wrong_steps = total_steps = invalid = no_valid = critiques = 0

    def add(acc: list[int], pred: frozenset[int], truth: frozenset[int], n: int) -> None:
        pred = frozenset(s for s in pred if 0 <= s < n)
        acc[0] += len(pred & truth)
        acc[1] += len(pred - truth)
        acc[2] += len(truth - pred)

    for truth, vs, n in zip(truths, verdicts, num_steps):
        n = int(n)
        truth = frozenset(s for s in truth if 0 <= s < n)
        wrong_steps += len(truth)
        total_steps += n
        critiques += len(vs)
        for v in vs:
            if v is INVALID:
                invalid += 1
            else:
                add(single, v, truth, n)
        if all(v is INVALID for v in vs):
            no_valid += 1
        for m in VOTES:
            add(voted[m], vote(vs, m) or frozenset(), truth, n)
    out: dict[str, Any] = {"single": _pr(*single)}
    out.update({m: _pr(*voted[m]) for m in VOTES})
    out.update({"responses": len(truths), "steps": total_steps, "true_wrong_steps": wrong_steps,
                "base_rate": wrong_steps / total_steps if total_steps else float("nan"),
                "critiques": critiques, "invalid_critiques": invalid, "responses_without_valid_critique": no_valid})
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def critic_table(pr: Mapping[str, Any], num_critiques: int, misjudge_prob: float) -> str:
    """A markdown table of `precision_recall`'s result."""
    lines = [f"Rule critic (misjudge_prob={misjudge_prob}, M={num_critiques}) on {pr['responses']} sampled responses, "
             f"{pr['steps']} steps, {pr['true_wrong_steps']} truly wrong (base rate {_fmt(pr['base_rate'])}); "
             f"{pr['invalid_critiques']}/{pr['critiques']} critiques unparsable.", "",
             "| verdict | precision | recall | F1 | TP | FP | FN |", "|---|---|---|---|---|---|---|"]
    for key, label in (("single", "single critique"), ("intersection", f"intersection of {num_critiques}"),
                       ("majority", f"majority of {num_critiques}"), ("union", f"union of {num_critiques}")):
        r = pr[key]
        lines.append(f"| {label} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | "
                     f"{r['tp']} | {r['fp']} | {r['fn']} |")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# One run's numbers

ACC, GREEDY, WRONG = "eval/sampled_accuracy", "eval/greedy_accuracy", "eval/sampled_step_error_rate"

# The per-run metrics of the report: key, label, digits.
METRICS = (
    ("final", "final sampled accuracy", 3),
    ("gain", "gain over step 0", 3),
    ("auc", "area under the accuracy curve", 3),
    ("steps_to_threshold", "steps to bootstrap + delta", 1),
    ("final_wrong", "final wrong-step rate", 3),
    ("final_greedy", "final greedy accuracy", 3),
)


def summarize_run(rows: Sequence[Mapping[str, Any]], threshold: float | None) -> dict[str, Any]:
    """A run's numbers from its metrics rows: sampled held-out accuracy at step 0 and at the last evaluation,
    the gain, the area under the accuracy curve (trapezoids over steps, divided by the steps spanned), the
    first evaluated step at or above `threshold`, the final wrong-step rate and greedy accuracy, and the curves."""
    es, acc = series(rows, ACC)
    gs, greedy = series(rows, GREEDY)
    ws, wrong = series(rows, WRONG)
    ts, train = series(rows, "reward/outcome_accuracy")
    out: dict[str, Any] = {"last_step": int(rows[-1]["step"]) if rows else 0, "eval_steps": es.tolist(),
                           "sampled_accuracy": acc.tolist(), "greedy_steps": gs.tolist(), "greedy_accuracy": greedy.tolist(),
                           "wrong_steps": ws.tolist(), "wrong_step_rate": wrong.tolist(),
                           "train_steps": ts.tolist(), "train_accuracy": train.tolist()}
    start = float(acc[0]) if acc.size and es[0] == 0 else None
    final = float(acc[-1]) if acc.size else None
    span = float(es[-1] - es[0]) if es.size > 1 else 0.0
    reached = None
    if threshold is not None and acc.size:
        hit = np.nonzero(acc >= float(threshold) - 1e-9)[0]
        reached = int(es[hit[0]]) if hit.size else None
    out.update({
        "start": start, "final": final, "gain": None if start is None or final is None else final - start,
        "auc": float(np.sum((acc[1:] + acc[:-1]) * np.diff(es)) / 2 / span) if span > 0 else None,
        "steps_to_threshold": reached,
        "final_wrong": float(wrong[-1]) if wrong.size else None,
        "final_greedy": float(greedy[-1]) if greedy.size else None,
    })
    return out


# ---------------------------------------------------------------------------------------------
# Variants (the grid) and the runs


@dataclasses.dataclass(frozen=True)
class Variant:
    """A set of config overrides applied on top of the base config, and the modes it runs."""

    name: str  # "base", or "critic.misjudge_prob=0.3"
    overrides: tuple[tuple[str, str], ...]
    modes: tuple[str, ...]

    def folder(self, out: str) -> str:
        return out if self.name == "base" else os.path.join(out, self.name)


def make_variants(grid: Sequence[str], modes: Sequence[str], config: Any) -> list[Variant]:
    """The base variant and one per `--grid KEY=V1,V2,...` value that differs from the base config's."""
    from capo_jax.config import ConfigError, apply_override, validate

    variants = [Variant("base", (), tuple(modes))]
    with_critic = tuple(m for m in modes if m not in CRITIC_FREE_MODES)
    for spec in grid:
        if "=" not in spec:
            raise ValueError(f"--grid takes KEY=V1,V2,... (e.g. critic.misjudge_prob=0,0.1,0.3), got {spec!r}")
        key, values = spec.split("=", 1)
        if key in RESERVED_KEYS:
            raise ValueError(f"--grid must not vary {key!r}: this command sets it per run")
        base_value = config
        for part in key.split("."):
            if part not in base_value:
                raise ValueError(f"--grid {key!r}: no such config key")
            base_value = base_value[part]
        for value in (v.strip() for v in values.split(",") if v.strip()):
            probe = config.copy_and_resolve_references()
            try:
                apply_override(probe, key, value)
                validate(probe, check_paths=False)
            except ConfigError as exc:
                raise ValueError(f"--grid {key}={value}: {exc}") from None
            changed = probe
            for part in key.split("."):
                changed = changed[part]
            if changed != base_value and with_critic:
                variants.append(Variant(f"{key}={value}", ((key, value),), with_critic))
    return variants


def resolve_config_path(path: str) -> str:
    """`path` as given when it exists, else relative to the repository root."""
    if os.path.exists(path):
        return os.path.abspath(path)
    alt = os.path.join(repo_root(), path)
    if os.path.exists(alt):
        return alt
    raise FileNotFoundError(f"config file {path!r} not found (also looked in {repo_root()})")


def repo_root() -> str:
    """The folder holding the capo_jax package (and configs/)."""
    import capo_jax

    return os.path.dirname(os.path.dirname(os.path.abspath(capo_jax.__file__)))


def check_extra(extra: Sequence[str]) -> None:
    """Reject `--extra` arguments that are not `--config.key=value` or that set what this command sets per run."""
    for arg in extra:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ValueError(f"--extra takes --config.key=value arguments only, got {arg!r}")
        key = arg[len("--config."):].split("=", 1)[0]
        if key in RESERVED_KEYS:
            raise ValueError(f"--extra must not set {key!r}: use --modes / --seeds / --out / --steps / --eval-every")


def load_config(config_path: str, extra: Sequence[str]):
    """The demo config with the `--extra` overrides applied (what every run trains with, less its own keys)."""
    from capo_jax.config import parse_args

    config, rest = parse_args(["--config", config_path, *extra])
    if rest:
        raise ValueError(f"unexpected arguments in --extra: {rest}")
    return config


def run_command(config_path: str, mode: str, seed: int, workdir: str, steps: int, eval_every: int,
                extra: Sequence[str], overrides: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The trainer command line of one (variant, mode, seed) run."""
    return [sys.executable, "-m", "capo_jax.train", "--config", config_path, "--config.logging.progress=false", *extra,
            *(f"--config.{k}={v}" for k, v in overrides), f"--config.eval.every={eval_every}",
            f"--config.reward.mode={mode}", f"--config.seed={seed}", f"--config.data.seed={seed}",
            f"--config.workdir={workdir}", f"--config.total_steps={steps}"]


def _last_logged_step(workdir: str) -> int:
    try:
        rows = read_metrics(workdir)
    except FileNotFoundError:
        return 0
    return int(rows[-1]["step"]) if rows else 0


def run_one(cmd: Sequence[str], workdir: str, steps: int, *, timeout: float | None = None, log=print) -> dict[str, Any]:
    """Train one run in a subprocess (reusing a finished one); returns ok, status, seconds."""
    name = os.path.relpath(workdir)
    if _last_logged_step(workdir) >= steps:
        log(f"[compare] {name}: already trained to step {steps}: reusing it")
        return {"ok": True, "status": "reused", "seconds": None}
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "train.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([repo_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log(f"[compare] {name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    try:
        with open(log_path, "a", encoding="utf-8") as f:
            rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=repo_root(), env=env,
                                timeout=timeout).returncode
        status = "ok" if rc == 0 else f"failed (exit {rc}, see {log_path})"
    except subprocess.TimeoutExpired:
        rc, status = -1, f"failed (timeout after {timeout:.0f}s)"
    seconds = time.perf_counter() - t0
    last = _last_logged_step(workdir)
    if rc == 0 and last < steps:
        status = f"failed (exit 0 but last logged step {last} < {steps})"
    log(f"[compare] {name}: {status} in {seconds:.0f}s")
    return {"ok": status == "ok", "status": status, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# The report


def mode_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and 95% interval over the ok runs of each per-run metric (steps_to_threshold over the runs that got there)."""
    ok = [r for r in runs if r.get("ok")]
    out: dict[str, Any] = {"runs": len(runs), "ok": len(ok), "seeds": [r["seed"] for r in ok],
                           "failed": [{"seed": r["seed"], "status": r.get("status")} for r in runs if not r.get("ok")],
                           "start": mean_ci([r.get("start") for r in ok])}
    for key, _, _ in METRICS:
        out[key] = mean_ci([r.get(key) for r in ok])
    out["reached_threshold"] = sum(r.get("steps_to_threshold") is not None for r in ok)
    return out


def paired_summary(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """a - b per metric, paired by seed over the ok runs of both."""
    def by_seed(runs, key):
        return {r["seed"]: r.get(key) for r in runs if r.get("ok")}

    return {key: paired_difference(by_seed(a, key), by_seed(b, key)) for key, _, _ in METRICS}


def _mode_row(label: str, s: Mapping[str, Any]) -> str:
    cells = [label, f"{s['ok']}/{s['runs']}", fmt_ci(s["start"])]
    for key, _, digits in METRICS:
        text = fmt_ci(s[key], digits)
        if key == "steps_to_threshold":
            text = f"{text} ({s['reached_threshold']}/{s['ok']} reached)" if s["reached_threshold"] else "never"
        cells.append(text)
    return "| " + " | ".join(cells) + " |"


def _diff_table(title: str, diffs: Mapping[str, Any]) -> list[str]:
    lines = [f"Paired difference {title} (per seed; mean [95% interval]; p of the paired t-test and of the "
             "Wilcoxon signed-rank test):", "",
             "| metric | difference | p (t-test) | p (signed-rank) | seeds |", "|---|---|---|---|---|"]
    for key, label, digits in METRICS:
        d = diffs[key]
        lines.append(f"| {label} | {fmt_ci(d, digits)} | {fmt_p(d['p'])} | {fmt_p(d['p_rank'])} | {d['n']} |")
    return lines


def build_report(runs: Sequence[Mapping[str, Any]], variants: Sequence[Variant], threshold: float | None,
                 delta: float) -> tuple[str, dict[str, Any]]:
    """The markdown tables and their numbers: per (variant, mode) summaries, CAPO - GRPO and variant - GRPO pairs."""
    header = ("| mode | runs ok | step-0 accuracy | " + " | ".join(label for _, label, _ in METRICS) + " |")
    sep = "|" + "---|" * (3 + len(METRICS))
    summary: dict[str, Any] = {"variants": {}}
    lines = [f"Sampled held-out accuracy; threshold for 'steps to' = bootstrap + {delta:.2f} = "
             f"{'n/a' if threshold is None else f'{threshold:.3f}'}. Mean [95% interval] over seeds.", "", header, sep]
    pick = lambda v, m: [r for r in runs if r["variant"] == v and r["mode"] == m]  # noqa: E731
    grpo = pick("base", "grpo")
    for v in variants:
        summary["variants"][v.name] = {m: mode_summary(pick(v.name, m)) for m in v.modes}
        for m in v.modes:
            lines.append(_mode_row(m if v.name == "base" else f"{m}, {v.name}", summary["variants"][v.name][m]))
    summary["paired"] = {}
    for v in variants:
        for m in v.modes:
            if m in CRITIC_FREE_MODES or not grpo:
                continue
            name = f"{m} - grpo" if v.name == "base" else f"{m} ({v.name}) - grpo"
            summary["paired"][name] = paired_summary(pick(v.name, m), grpo)
            lines += [""] + _diff_table(name, summary["paired"][name])
    lines += ["", "| run | status | last step | step-0 accuracy | final | gain | wall s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        name = f"{r['mode']}_s{r['seed']}" + ("" if r["variant"] == "base" else f" ({r['variant']})")
        cells = [name, r.get("status", ""), str(r.get("last_step", "n/a"))]
        cells += [_fmt(r.get(k)) for k in ("start", "final", "gain")] + [_fmt(r.get("seconds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------
# The rule critic on the bootstrap's own responses


def shared_bootstrap(config: Any, log=print) -> str:
    """The one policy every run starts from: the trainer's own choice (`policy.path`, else the cached demo bootstrap for
    these settings, trained now if missing)."""
    from capo_jax.rl.loop import resolve_policy_path

    return resolve_policy_path(config, logger=log)


def critic_precision_recall(config: Any, policy_path: str, *, misjudge_prob: float, num_problems: int, samples: int,
                            seed: int = 1234, log=print) -> dict[str, Any]:
    """The rule critic's step-level precision / recall against the true wrong steps, one critique and each vote of
    M = critic.num_critiques, on `samples` responses per held-out problem that the policy samples at the rollout
    temperature."""
    from transformers import AutoTokenizer

    from capo_jax.critic import parse_verdict
    from capo_jax.critic.base import CritiqueRequest
    from capo_jax.critic.rule import RuleCritic, true_wrong_steps
    from capo_jax.data.arithmetic import DEFAULT_TEMPLATE, ArithmeticWorld, format_prompt
    from capo_jax.models import from_pretrained
    from capo_jax.rewards.steps import split_steps
    from capo_jax.sampling import SamplingParams, generate_text

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(policy_path, local_files_only=True)
    model = from_pretrained(policy_path, dtype=str(config.optim.compute_dtype))
    tests = ArithmeticWorld(config.data.world.to_dict()).test_set()[:num_problems]
    params = SamplingParams(n=samples, temperature=float(config.rollout.temperature), top_k=int(config.rollout.top_k),
                            top_p=float(config.rollout.top_p), max_new_tokens=int(config.rollout.max_new_tokens))
    template = config.data.template or DEFAULT_TEMPLATE
    texts = generate_text(model, tok, [format_prompt(p.question, template) for p in tests], params, seed).texts
    delim = str(config.reward.step_delimiter)
    M, base = int(config.critic.num_critiques), int(config.critic.index_base)
    critic = RuleCritic(misjudge_prob=float(misjudge_prob), index_base=base)
    truths, requests, num_steps = [], [], []
    include_ref = bool(config.critic.include_reference)
    for i, text in enumerate(texts):
        problem = tests[i // samples]
        steps = split_steps(text, delim) or [text]
        truths.append(true_wrong_steps(steps, problem.question))
        num_steps.append(len(steps))
        requests.append(CritiqueRequest(question=problem.question, steps=tuple(steps),
                                        reference=problem.answer if include_ref else None))
    critiques = critic.critique(requests, M, np.random.default_rng([seed, 11]))
    verdicts = [[parse_verdict(c, n, index_base=base) for c in row] for row, n in zip(critiques, num_steps)]
    pr = precision_recall(truths, verdicts, num_steps)
    pr.update({"num_critiques": M, "misjudge_prob": float(misjudge_prob), "temperature": float(config.rollout.temperature),
               "problems": len(tests), "samples_per_problem": samples})
    log(f"[compare] critic precision/recall at misjudge_prob={misjudge_prob} on {len(texts)} responses "
        f"({time.perf_counter() - t0:.0f}s)")
    return pr


# ---------------------------------------------------------------------------------------------
# The command


def parse_seeds(text: str) -> list[int]:
    """`0-7` or `0,1,2` (or a mix: `0-3,10`) -> sorted distinct seeds."""
    seeds: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "-" in part[1:]:
            lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
            seeds.update(range(int(lo), int(hi) + 1))
        else:
            seeds.add(int(part))
    return sorted(seeds)


def parse_cli(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (everything after `--extra` goes to the trainer)."""
    argv = list(argv)
    extra: list[str] = []
    if "--extra" in argv:
        i = argv.index("--extra")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m capo_jax.demo.compare", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0-7", help="seeds as 0-7 or 0,1,2 (default 0-7)")
    p.add_argument("--steps", type=int, default=0, help="RL steps per run (default: the config's total_steps)")
    p.add_argument("--modes", default="capo,grpo", help="comma-separated reward modes (default capo,grpo)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--config", default="configs/demo.py", help="trainer config file (default configs/demo.py)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every K steps (default: the config's)")
    p.add_argument("--delta", type=float, default=0.10, help="'steps to' threshold above the bootstrap accuracy (default 0.10)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a variant per value of a critic setting, e.g. critic.misjudge_prob=0,0.1,0.3 (repeatable)")
    p.add_argument("--critic-problems", type=int, default=64, help="held-out problems for the critic P/R (0 = skip)")
    p.add_argument("--critic-samples", type=int, default=4, help="responses sampled per problem for the critic P/R")
    p.add_argument("--run-timeout", type=float, default=0.0, help="seconds before a run is killed (0 = no limit)")
    p.add_argument("--fresh", action="store_true", help="delete the run folders of this comparison first")
    args = p.parse_args(argv)
    args.extra = extra
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError:
        p.error(f"--seeds takes 0-7 or 0,1,2, got {args.seeds!r}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in KNOWN_MODES]
    if bad or not args.mode_list or not args.seed_list:
        p.error(f"--modes takes {', '.join(KNOWN_MODES)} (got {args.modes!r}); --seeds needs at least one seed")
    if args.steps < 0 or args.eval_every < 0:
        p.error("--steps and --eval-every must be >= 0")
    try:
        check_extra(extra)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (variant, mode, seed), then write the report and plots and print the tables; returns the exit status."""
    args = parse_cli(sys.argv[1:] if argv is None else argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    config_path = resolve_config_path(args.config)
    config = load_config(config_path, args.extra)
    try:
        variants = make_variants(args.grid, args.mode_list, config)
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    steps = args.steps or int(config.total_steps)
    eval_every = args.eval_every or int(config.eval.every) or max(steps // 6, 1)
    t_start = time.perf_counter()

    bootstrap = shared_bootstrap(config)
    critic = {}
    misjudges = sorted({float(config.critic.misjudge_prob)} | {float(v) for v in _grid_values(args.grid, "critic.misjudge_prob")})
    for p in misjudges:
        if args.critic_problems > 0:
            critic[str(p)] = critic_precision_recall(config, bootstrap, misjudge_prob=p, num_problems=args.critic_problems,
                                                     samples=args.critic_samples)

    runs: list[dict[str, Any]] = []
    for seed in args.seed_list:  # seeds outer: a cut-short comparison still has every mode for the first seeds
        for v in variants:
            for mode in v.modes:
                workdir = os.path.join(v.folder(out), f"{mode}_s{seed}")
                if args.fresh:
                    shutil.rmtree(workdir, ignore_errors=True)
                cmd = run_command(config_path, mode, seed, workdir, steps, eval_every, args.extra, v.overrides)
                r = {"variant": v.name, "mode": mode, "seed": seed, "workdir": workdir}
                r.update(run_one(cmd, workdir, steps, timeout=args.run_timeout or None))
                runs.append(r)
    for r in runs:
        try:
            r["rows"] = read_metrics(r["workdir"])
        except (OSError, ValueError) as exc:
            r.update(ok=False, status=f"failed: unreadable metrics ({exc})", rows=[])
    starts = [row[ACC] for r in runs if r["ok"] for row in r["rows"] if row.get("step") == 0 and ACC in row]
    threshold = float(np.mean(starts)) + args.delta if starts else None
    for r in runs:
        r.update(summarize_run(r.pop("rows"), threshold))

    table, summary = build_report(runs, variants, threshold, args.delta)
    results = {"settings": {"seeds": args.seed_list, "modes": args.mode_list, "steps": steps, "eval_every": eval_every,
                            "config": config_path, "extra": args.extra, "grid": args.grid, "delta": args.delta,
                            "eval_problems": int(config.eval.num_problems), "eval_samples": int(config.eval.samples)},
               "bootstrap": bootstrap, "threshold": threshold, "runs": runs, "summary": summary, "critic": critic,
               "seconds": time.perf_counter() - t_start}
    md = [f"# CAPO vs GRPO on the arithmetic demo ({steps} steps, seeds {args.seeds})", "",
          f"One shared bootstrap ({bootstrap}); every run evaluates it at step 0 and every {eval_every} steps on "
          f"{int(config.eval.num_problems)} held-out problems x {int(config.eval.samples)} samples at the rollout "
          f"temperature ({float(config.rollout.temperature)}).", "", table]
    for p, pr in critic.items():
        md += ["", critic_table(pr, int(config.critic.num_critiques), float(p))]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=1)
    try:
        base = {m: [r for r in runs if r["variant"] == "base" and r["mode"] == m and r["ok"]] for m in args.mode_list}
        plot_comparison(base, os.path.join(out, "compare.png"), title=f"CAPO vs GRPO over seeds {args.seeds}")
        if len(variants) > 1:
            groups = {"grpo": base.get("grpo", [])} if "grpo" in base else {}
            for v in variants:
                for m in v.modes:
                    if m not in CRITIC_FREE_MODES:
                        groups[f"{m}" if v.name == "base" else f"{m}, {v.name}"] = [
                            r for r in runs if r["variant"] == v.name and r["mode"] == m and r["ok"]]
            plot_comparison(groups, os.path.join(out, "sweep.png"), title="critic sweep", panels=("sampled",))
    except Exception as exc:  # noqa: BLE001 - the tables and json are the result; a plot failure is reported
        print(f"[compare] plotting failed: {exc}", file=sys.stderr)
    print(text)
    print(f"[compare] wrote {out}/compare.md, compare.json, compare.png in {results['seconds']:.0f}s")
    return 0 if all(r["ok"] for r in runs) else 1


def _grid_values(grid: Sequence[str], key: str) -> list[str]:
    return [v.strip() for spec in grid if spec.startswith(key + "=") for v in spec.split("=", 1)[1].split(",") if v.strip()]


if __name__ == "__main__":
    sys.exit(main())
