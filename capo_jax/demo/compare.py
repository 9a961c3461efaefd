"""`python -m capo_jax.demo.compare`: CAPO vs GRPO on the arithmetic demo, several seeds, one shared bootstrap.

    python -m capo_jax.demo.compare [--seeds 0,1,2] [--steps N] [--modes capo,grpo] [--out DIR]
                                    [--eval-every K] [--fresh] [--extra --config.key=value ...]

It bootstraps the demo policy once into `<out>/bootstrap` (reused when its settings hash
matches), links it into every run's workdir `<out>/<mode>_s<seed>` (the trainer always looks in
`<workdir>/bootstrap`), runs `python -m capo_jax.train --config configs/demo.py` for each
(mode, seed) as a subprocess, one after the other (a finished run found in its workdir is
reused; an unfinished one resumes from its checkpoint), and writes `<out>/compare.md`,
`<out>/compare.json` and `<out>/compare.png` (and each run's `curves.png`). It also measures the rule critic's step-level
precision and recall, one critique against the intersection / majority / union vote of M, on
responses the bootstrapped policy samples for held-out problems. `--extra` must come last: all
arguments after it go to every training run (and to the bootstrap's settings).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from capo_jax.demo.plot import plot_comparison, plot_run, series
from capo_jax.metrics import read_metrics

VOTES = ("intersection", "majority", "union")
RESERVED_KEYS = ("reward.mode", "seed", "workdir", "total_steps")  # set per run by this command
KNOWN_MODES = ("capo", "grpo", "genorm")


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
# Per-run summaries and the table


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1) of the values; std None for fewer than 2, both None for none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def summarize_run(rows: Sequence[Mapping[str, Any]], threshold: float | None, *, last_k: int = 5) -> dict[str, Any]:
    """Final eval accuracy and wrong-step fraction, first step with eval accuracy >= threshold, curves, of one run."""
    es, acc = series(rows, "eval/accuracy")
    ws, wrong = series(rows, "eval/step_error_rate")
    ts, train = series(rows, "reward/outcome_accuracy")
    reached = None
    if threshold is not None:
        hit = np.nonzero(acc >= float(threshold) - 1e-9)[0]
        reached = int(es[hit[0]]) if hit.size else None
    return {
        "last_step": int(rows[-1]["step"]) if rows else 0,
        "final_eval_accuracy": float(acc[-1]) if acc.size else None,
        "final_eval_step": int(es[-1]) if es.size else None,
        "final_wrong_step_frac": float(wrong[-1]) if wrong.size else None,
        "final_train_accuracy": float(train[-last_k:].mean()) if train.size else None,
        "mean_eval_accuracy": float(acc.mean()) if acc.size else None,
        "best_eval_accuracy": float(acc.max()) if acc.size else None,
        "steps_to_threshold": reached,
        "eval_steps": es.tolist(), "eval_accuracy": acc.tolist(),
        "eval_wrong_step_frac": [dict(zip(ws.tolist(), wrong.tolist())).get(s) for s in es.tolist()],
        "train_steps": ts.tolist(), "train_outcome_accuracy": train.tolist(),
    }


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def build_table(runs: Sequence[Mapping[str, Any]], threshold: float | None,
                modes: Sequence[str] | None = None) -> tuple[str, dict[str, Any]]:
    """The comparison table (markdown) and its numbers per mode, from per-run dicts.

    Each run dict holds `mode`, `seed`, `ok` (bool), `status` (text) and, when ok, the fields of
    `summarize_run`. Per mode: mean ± std over its ok seeds of the final held-out accuracy, the final
    wrong-step fraction, the held-out accuracy averaged over the run's evals (less noisy than the last
    one), the final train accuracy, and of the first step reaching `threshold` (over
    the seeds that reached it, with the count that did).
    """
    modes = list(modes) if modes else sorted({r["mode"] for r in runs})
    summary: dict[str, Any] = {}
    thr = "n/a" if threshold is None else f"{threshold:.3f}"
    lines = [f"| mode | runs ok | final held-out accuracy | final wrong-step fraction | first step with eval acc >= {thr} "
             "| mean held-out accuracy over evals | final train accuracy (last 5 steps) |",
             "|---|---|---|---|---|---|---|"]
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        ok = [r for r in mine if r.get("ok")]
        acc = mean_std([r["final_eval_accuracy"] for r in ok if r.get("final_eval_accuracy") is not None])
        wrong = mean_std([r["final_wrong_step_frac"] for r in ok if r.get("final_wrong_step_frac") is not None])
        train = mean_std([r["final_train_accuracy"] for r in ok if r.get("final_train_accuracy") is not None])
        avg = mean_std([r["mean_eval_accuracy"] for r in ok if r.get("mean_eval_accuracy") is not None])
        hits = [r["steps_to_threshold"] for r in ok if r.get("steps_to_threshold") is not None]
        reach = mean_std(hits)
        summary[mode] = {"runs": len(mine), "ok": len(ok), "seeds": [r["seed"] for r in ok],
                         "failed": [{"seed": r["seed"], "status": r.get("status")} for r in mine if not r.get("ok")],
                         "final_eval_accuracy": acc, "final_wrong_step_frac": wrong, "final_train_accuracy": train,
                         "mean_eval_accuracy": avg,
                         "steps_to_threshold": reach, "reached_threshold": len(hits)}
        reach_txt = "never" if not hits else f"{_pm(*reach, digits=1)} ({len(hits)}/{len(ok)} reached)"
        lines.append(f"| {mode} | {len(ok)}/{len(mine)} | {_pm(*acc)} | {_pm(*wrong)} | {reach_txt if ok else 'n/a'} "
                     f"| {_pm(*avg)} | {_pm(*train)} |")
    lines += ["", "| run | status | last step | final held-out accuracy | final wrong-step fraction | "
              "first step >= threshold | wall s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        reach = r.get("steps_to_threshold")
        lines.append(f"| {r['mode']}_s{r['seed']} | {r.get('status', '')} | {r.get('last_step', 'n/a')} | "
                     f"{_fmt(r.get('final_eval_accuracy'))} | {_fmt(r.get('final_wrong_step_frac'))} | "
                     f"{'never' if reach is None and r.get('ok') else _fmt(reach)} | {_fmt(r.get('seconds'), 0)} |")
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------
# The runs


def repo_root() -> str:
    """The folder holding the capo_jax package (and configs/)."""
    import capo_jax

    return os.path.dirname(os.path.dirname(os.path.abspath(capo_jax.__file__)))


def resolve_config_path(path: str) -> str:
    """`path` as given when it exists, else relative to the repository root."""
    if os.path.exists(path):
        return os.path.abspath(path)
    alt = os.path.join(repo_root(), path)
    if os.path.exists(alt):
        return alt
    raise FileNotFoundError(f"config file {path!r} not found (also looked in {repo_root()})")


def check_extra(extra: Sequence[str]) -> None:
    """Reject `--extra` arguments that are not `--config.key=value` or that set what this command sets per run."""
    for arg in extra:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ValueError(f"--extra takes --config.key=value arguments only, got {arg!r}")
        key = arg[len("--config."):].split("=", 1)[0]
        if key in RESERVED_KEYS:
            raise ValueError(f"--extra must not set {key!r}: use --modes / --seeds / --out / --steps")


def load_config(config_path: str, extra: Sequence[str]):
    """The demo config with the `--extra` overrides applied (what every run trains with, less its own keys)."""
    from capo_jax.config import parse_args

    config, rest = parse_args(["--config", config_path, *extra])
    if rest:
        raise ValueError(f"unexpected arguments in --extra: {rest}")
    return config


def shared_bootstrap(config: Any, out: str, log=print) -> str:
    """Bootstrap the demo policy once into `<out>/bootstrap` (reused when its settings hash matches)."""
    if config.policy.path:
        return config.policy.path
    from capo_jax.demo.bootstrap import bootstrap_policy

    return bootstrap_policy(os.path.join(out, "bootstrap"), world=config.data.world.to_dict(),
                            model=config.demo.model.to_dict(), sft=config.demo.sft.to_dict(), log=log)


def link_bootstrap(shared: str, workdir: str) -> None:
    """Make `<workdir>/bootstrap` a (relative) symlink to the shared bootstrap folder."""
    os.makedirs(workdir, exist_ok=True)
    dst = os.path.join(workdir, "bootstrap")
    if os.path.islink(dst):
        os.unlink(dst)
    elif os.path.exists(dst):
        raise RuntimeError(f"{dst} is a real folder, not a link to the shared bootstrap: rerun with --fresh")
    os.symlink(os.path.relpath(os.path.abspath(shared), os.path.abspath(workdir)), dst)


def run_command(config_path: str, mode: str, seed: int, workdir: str, steps: int, eval_every: int,
                extra: Sequence[str]) -> list[str]:
    """The trainer command line of one (mode, seed) run."""
    return [sys.executable, "-m", "capo_jax.train", "--config", config_path, f"--config.eval.every={eval_every}",
            "--config.logging.progress=false", *extra, f"--config.reward.mode={mode}", f"--config.seed={seed}",
            f"--config.workdir={workdir}", f"--config.total_steps={steps}"]


def _last_logged_step(workdir: str) -> int:
    try:
        rows = read_metrics(workdir)
    except FileNotFoundError:
        return 0
    return int(rows[-1]["step"]) if rows else 0


def run_one(config_path: str, mode: str, seed: int, out: str, steps: int, eval_every: int, extra: Sequence[str],
            bootstrap: str, *, timeout: float | None = None, log=print) -> dict[str, Any]:
    """Train one (mode, seed) run in a subprocess (reusing a finished one); returns mode, seed, ok, status, seconds."""
    workdir = os.path.join(out, f"{mode}_s{seed}")
    result: dict[str, Any] = {"mode": mode, "seed": seed, "workdir": workdir, "ok": False, "seconds": 0.0}
    if _last_logged_step(workdir) >= steps:
        log(f"[compare] {mode}_s{seed}: already trained to step {steps} in {workdir}: reusing it")
        return {**result, "ok": True, "status": "reused", "seconds": None}  # trained by an earlier invocation
    try:
        link_bootstrap(bootstrap, workdir)
    except (OSError, RuntimeError) as exc:
        return {**result, "status": f"failed: {exc}"}
    cmd = run_command(config_path, mode, seed, workdir, steps, eval_every, extra)
    log_path = os.path.join(workdir, "train.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([repo_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log(f"[compare] {mode}_s{seed}: {' '.join(cmd[1:])}  (log: {log_path})")
    t0 = time.perf_counter()
    try:
        with open(log_path, "a", encoding="utf-8") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=repo_root(), env=env, timeout=timeout)
        rc = proc.returncode
        status = "ok" if rc == 0 else f"failed (exit {rc}, see {log_path})"
    except subprocess.TimeoutExpired:
        rc, status = -1, f"failed (timeout after {timeout:.0f}s)"
    result["seconds"] = time.perf_counter() - t0
    last = _last_logged_step(workdir)
    if rc == 0 and last < steps:
        status = f"failed (exit 0 but last logged step {last} < {steps})"
    log(f"[compare] {mode}_s{seed}: {status} in {result['seconds']:.0f}s")
    return {**result, "ok": status == "ok", "status": status}


# ---------------------------------------------------------------------------------------------
# The bootstrapped policy: step-0 evaluation and critic precision / recall


def measure_policy(config: Any, policy_path: str, *, num_problems: int, samples: int, seed: int = 1234,
                   log=print) -> dict[str, Any]:
    """The policy's held-out eval (as the trainer computes it: greedy, eval.num_problems) and the rule critic's P/R.

    P/R: `samples` responses per held-out problem at the rollout temperature, true wrong steps from
    `true_wrong_steps`, M = critic.num_critiques critiques each from `RuleCritic(critic.misjudge_prob)`.
    """
    from transformers import AutoTokenizer

    from capo_jax.critic import parse_verdict
    from capo_jax.critic.base import CritiqueRequest
    from capo_jax.critic.rule import RuleCritic, true_wrong_steps
    from capo_jax.data.arithmetic import ArithmeticWorld, format_prompt
    from capo_jax.demo.bootstrap import world_accuracy
    from capo_jax.models import from_pretrained
    from capo_jax.rewards.steps import split_steps
    from capo_jax.sampling import SamplingParams, generate_text

    tok = AutoTokenizer.from_pretrained(policy_path, local_files_only=True)
    model = from_pretrained(policy_path, dtype=str(config.optim.compute_dtype))
    world = ArithmeticWorld(config.data.world.to_dict())
    max_new = int(config.eval.max_new_tokens) or int(config.rollout.max_new_tokens)
    t0 = time.perf_counter()
    boot = world_accuracy(model, tok, world, int(config.eval.num_problems), max_new)
    log(f"[compare] bootstrap held-out accuracy {boot['accuracy']:.3f}, wrong-step fraction "
        f"{boot['step_error_rate']:.3f} on {boot['num']} problems ({time.perf_counter() - t0:.0f}s)")
    out: dict[str, Any] = {"bootstrap_eval": boot}
    if num_problems <= 0 or samples <= 0:
        return out
    t0 = time.perf_counter()
    tests = world.test_set()[:num_problems]
    params = SamplingParams(n=samples, temperature=float(config.rollout.temperature), top_k=int(config.rollout.top_k),
                            top_p=float(config.rollout.top_p), max_new_tokens=int(config.rollout.max_new_tokens))
    texts = generate_text(model, tok, [format_prompt(p.question) for p in tests], params, seed).texts
    delim = str(config.reward.step_delimiter)
    M, base = int(config.critic.num_critiques), int(config.critic.index_base)
    critic = RuleCritic(misjudge_prob=float(config.critic.misjudge_prob), index_base=base)
    truths, requests, num_steps = [], [], []
    include_ref = bool(config.critic.include_reference)
    for i, text in enumerate(texts):
        problem = tests[i // samples]
        steps = split_steps(text, delim) or [text]
        truths.append(true_wrong_steps(steps))
        num_steps.append(len(steps))
        requests.append(CritiqueRequest(question=problem.question, steps=tuple(steps),
                                        reference=problem.answer if include_ref else None))
    critiques = critic.critique(requests, M, np.random.default_rng([seed, 11]))
    verdicts = [[parse_verdict(c, n, index_base=base) for c in row] for row, n in zip(critiques, num_steps)]
    pr = precision_recall(truths, verdicts, num_steps)
    pr.update({"num_critiques": M, "misjudge_prob": float(config.critic.misjudge_prob),
               "temperature": float(config.rollout.temperature), "problems": len(tests), "samples_per_problem": samples})
    log(f"[compare] critic precision/recall on {len(texts)} responses ({time.perf_counter() - t0:.0f}s)")
    out["critic"] = pr
    return out


# ---------------------------------------------------------------------------------------------
# The command


def parse_cli(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (everything after `--extra` goes to the trainer)."""
    argv = list(argv)
    extra: list[str] = []
    if "--extra" in argv:
        i = argv.index("--extra")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m capo_jax.demo.compare", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=60, help="RL steps per run (default 60, the demo's)")
    p.add_argument("--modes", default="capo,grpo", help="comma-separated reward modes (default capo,grpo)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--config", default="configs/demo.py", help="trainer config file (default configs/demo.py)")
    p.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every K steps (default 5)")
    p.add_argument("--threshold", type=float, default=None,
                   help="eval accuracy threshold for 'first step reaching'; default bootstrap accuracy + --delta")
    p.add_argument("--delta", type=float, default=0.10, help="threshold above the bootstrap accuracy (default 0.10)")
    p.add_argument("--critic-problems", type=int, default=64, help="held-out problems for the critic P/R (0 = skip)")
    p.add_argument("--critic-samples", type=int, default=4, help="responses sampled per problem for the critic P/R")
    p.add_argument("--run-timeout", type=float, default=0.0, help="seconds before a run is killed (0 = no limit)")
    p.add_argument("--fresh", action="store_true", help="delete existing run folders <out>/<mode>_s<seed> first")
    args = p.parse_args(argv)
    args.extra = extra
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in KNOWN_MODES]
    if bad or not args.mode_list or not args.seed_list:
        p.error(f"--modes takes {', '.join(KNOWN_MODES)} (got {args.modes!r}); --seeds needs at least one seed")
    if args.steps < 1 or args.eval_every < 0:
        p.error("--steps must be >= 1 and --eval-every >= 0")
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
    """Run every (mode, seed), then write compare.md / .json / .png and print the table; returns the exit status."""
    args = parse_cli(sys.argv[1:] if argv is None else argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    config_path = resolve_config_path(args.config)
    config = load_config(config_path, args.extra)
    t_start = time.perf_counter()

    bootstrap = shared_bootstrap(config, out)
    measured = measure_policy(config, bootstrap, num_problems=args.critic_problems, samples=args.critic_samples)
    boot_acc = float(measured["bootstrap_eval"]["accuracy"])
    threshold = args.threshold if args.threshold is not None else round(boot_acc + args.delta, 6)

    runs: list[dict[str, Any]] = []
    for seed in args.seed_list:  # seeds outer: a cut-short comparison still has every mode for the first seeds
        for mode in args.mode_list:
            if args.fresh:
                shutil.rmtree(os.path.join(out, f"{mode}_s{seed}"), ignore_errors=True)
            r = run_one(config_path, mode, seed, out, args.steps, args.eval_every, args.extra, bootstrap,
                        timeout=args.run_timeout or None)
            if r["ok"] or os.path.exists(os.path.join(r["workdir"], "metrics.jsonl")):
                try:
                    r.update(summarize_run(read_metrics(r["workdir"]), threshold))
                except (OSError, ValueError) as exc:
                    r.update(ok=False, status=f"failed: unreadable metrics ({exc})")
                try:
                    plot_run(r["workdir"])
                except Exception as exc:  # noqa: BLE001 - a plot failure is reported, never fatal
                    print(f"[compare] plotting {r['workdir']} failed: {exc}", file=sys.stderr)
            runs.append(r)

    table, summary = build_table(runs, threshold, args.mode_list)
    results = {"settings": {"seeds": args.seed_list, "modes": args.mode_list, "steps": args.steps,
                            "eval_every": args.eval_every, "config": config_path, "extra": args.extra,
                            "eval_problems": int(config.eval.num_problems), "delta": args.delta},
               "bootstrap": bootstrap, "bootstrap_eval": measured["bootstrap_eval"], "threshold": threshold,
               "runs": runs, "summary": summary, "critic": measured.get("critic"),
               "seconds": time.perf_counter() - t_start}
    boot = measured["bootstrap_eval"]
    md = [f"# CAPO vs GRPO on the arithmetic demo ({args.steps} steps, seeds {args.seeds})", "",
          f"Bootstrap (step 0) held-out accuracy {boot['accuracy']:.3f}, wrong-step fraction "
          f"{boot['step_error_rate']:.3f} on {boot['num']} problems (greedy). Threshold = {threshold:.3f}"
          f"{'' if args.threshold is not None else f' (bootstrap + {args.delta:.2f})'}. "
          f"Mean ± sample std over seeds; held-out eval every {args.eval_every} steps on "
          f"{int(config.eval.num_problems)} problems.", "", table]
    if measured.get("critic"):
        md += ["", critic_table(measured["critic"], int(config.critic.num_critiques), float(config.critic.misjudge_prob))]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=1)
    try:
        plot_comparison(results, os.path.join(out, "compare.png"))
    except Exception as exc:  # noqa: BLE001 - the table and json are the result; a plot failure is reported
        print(f"[compare] plotting failed: {exc}", file=sys.stderr)
    print(text)
    print(f"[compare] wrote {out}/compare.md, compare.json, compare.png in {results['seconds']:.0f}s")
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
