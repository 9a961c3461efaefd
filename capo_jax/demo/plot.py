"""Plots of the demo: one run's training curves (`plot_run`) and CAPO vs GRPO over seeds (`plot_comparison`).

matplotlib is imported inside the functions (Agg backend), so importing this module costs nothing.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from capo_jax.metrics import read_metrics

# The panels of `plot_run`: (title, y floor at 0, lines). A line is (metric key, label, kind): "eval" lines are
# held-out evaluations drawn as points with their 95% interval (from `<key>_se` when logged; the step-0 row,
# the policy before RL, is also drawn as a dashed reference line); "train" lines are per-step values, drawn
# faint with a 10-step running mean over them.
RUN_PANELS: tuple[tuple[str, bool, tuple[tuple[str, str, str], ...]], ...] = (
    ("held-out answer accuracy", False, (("eval/sampled_accuracy", "sampled (rollout temperature)", "eval"),
                                         ("eval/greedy_accuracy", "greedy", "eval"),
                                         ("reward/outcome_accuracy", "training rollouts", "train"))),
    ("mean sequence reward (training rollouts)", False, (("reward/mean", "reward", "train"),)),
    ("held-out true wrong-step rate, and answers boxed early", True, (
        ("eval/sampled_step_error_rate", "sampled", "eval"), ("eval/greedy_step_error_rate", "greedy", "eval"),
        ("eval/greedy_early_answer_rate", "greedy: answered early", "eval"))),
    ("tokens in voted-wrong steps (training rollouts)", True, (("reward/frac_tokens_penalized", "fraction penalised", "train"),)),
)
SMOOTH = 10  # steps in the running mean of "train" lines

MODE_COLORS = {"capo": "tab:blue", "grpo": "tab:orange", "genorm": "tab:green"}


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that hold a finite number under `key`."""
    xs, ys = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(row["step"]))
            ys.append(float(v))
    return np.asarray(xs, np.int64), np.asarray(ys, np.float64)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _draw(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, label: str, kind: str, color: str) -> bool:
    """One line of a run panel; returns whether the metric was there."""
    xs, ys = series(rows, key)
    if not xs.size:
        return False
    if kind == "train":
        ax.plot(xs, ys, "-", color=color, alpha=0.25, lw=1)
        ax.plot(xs, _running_mean(ys, SMOOTH), "-", color=color, lw=1.5, label=f"{label} ({SMOOTH}-step mean)")
        return True
    se_x, se = series(rows, key + "_se")
    err = 1.96 * np.asarray([dict(zip(se_x.tolist(), se.tolist())).get(int(x), 0.0) for x in xs])
    ax.errorbar(xs, ys, yerr=err if se.size else None, fmt="o-", color=color, markersize=4, capsize=2, label=label)
    if xs[0] == 0:
        ax.axhline(ys[0], color=color, ls="--", lw=1, alpha=0.7, label=f"{label} before RL: {ys[0]:.3f}")
    return True


def plot_run(workdir: str, out_png: str | None = None) -> str:
    """Plot a run's curves from `<workdir>/metrics.jsonl` into a PNG (default `<workdir>/curves.png`); returns its path.

    Panels whose metrics are absent are left out; held-out evaluations carry 95% error bars and the step-0
    evaluation (the policy before RL) as a dashed reference line."""
    rows = read_metrics(workdir)
    out_png = out_png or os.path.join(workdir, "curves.png")
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    present = [(title, floor, lines) for title, floor, lines in RUN_PANELS if any(series(rows, k)[0].size for k, _, _ in lines)]
    n = max(len(present), 1)
    cols = 2 if n > 1 else 1
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.8 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, (title, floor, lines) in zip(flat, present):
        for i, (key, label, kind) in enumerate(lines):
            _draw(ax, rows, key, label, kind, colors[i % len(colors)])
        if floor:
            ax.set_ylim(bottom=0.0, top=max(ax.get_ylim()[1], 0.25))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not present:
        flat[0].text(0.5, 0.5, f"no known metrics in {len(rows)} rows", ha="center", va="center")
        flat[0].set_axis_off()
    for ax in flat[len(present) if present else 1:]:
        ax.set_axis_off()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def mean_band(curves: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, half-width of the 95% Student-t interval of the mean) over curves, at the steps every
    curve has (half-width 0 for one curve)."""
    from scipy import stats

    if not curves:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    common = set(int(s) for s in curves[0][0])
    for xs, _ in curves[1:]:
        common &= set(int(s) for s in xs)
    steps = np.asarray(sorted(common), np.int64)
    if not steps.size:
        return steps, np.zeros(0), np.zeros(0)
    stacked = np.stack([np.asarray([dict(zip(map(int, xs), ys))[int(s)] for s in steps], np.float64) for xs, ys in curves])
    n = stacked.shape[0]
    half = (stats.t.ppf(0.975, n - 1) * stacked.std(0, ddof=1) / np.sqrt(n)) if n > 1 else np.zeros(steps.size)
    return steps, stacked.mean(0), half


def _running_mean(ys: np.ndarray, window: int) -> np.ndarray:
    if ys.size == 0 or window <= 1:
        return ys
    c = np.cumsum(np.insert(ys, 0, 0.0))
    out = np.empty_like(ys)
    for i in range(ys.size):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


# Panels of `plot_comparison`: name -> (title, x key, y key of a run summary, running-mean window, y floor at 0).
COMPARE_PANELS = {
    "sampled": ("held-out accuracy, sampled at the rollout temperature", "eval_steps", "sampled_accuracy", 1, False),
    "greedy": ("held-out accuracy, greedy", "greedy_steps", "greedy_accuracy", 1, False),
    "wrong": ("held-out true wrong-step rate (sampled)", "wrong_steps", "wrong_step_rate", 1, True),
    "train": (f"training rollouts' accuracy ({SMOOTH}-step running mean)", "train_steps", "train_accuracy", SMOOTH, False),
}


def plot_comparison(groups: Mapping[str, Sequence[Mapping[str, Any]]], out_png: str, *, title: str = "",
                    panels: Sequence[str] = ("sampled", "greedy", "wrong", "train")) -> str:
    """Mean curve over seeds of each group of runs (e.g. {"capo": [...], "grpo": [...]}) with its 95% band, one
    panel per entry of `panels` (keys of COMPARE_PANELS); each run is a `compare.summarize_run` dict."""
    plt = _pyplot()
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 4.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.ravel(), panels):
        name, xkey, ykey, window, floor = COMPARE_PANELS[panel]
        for i, (label, runs) in enumerate(groups.items()):
            curves = [(list(r.get(xkey) or []), _running_mean(np.asarray(r.get(ykey) or [], np.float64), window))
                      for r in runs if r.get(xkey)]
            steps, mean, half = mean_band(curves)
            if not steps.size:
                continue
            color = MODE_COLORS.get(label, colors[i % len(colors)])
            ax.plot(steps, mean, "o-" if window == 1 else "-", color=color, markersize=3, label=f"{label} (n={len(curves)})")
            ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2)
        if floor:
            ax.set_ylim(bottom=0.0, top=max(ax.get_ylim()[1], 0.25))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any(groups.values()):
        axes[0][0].text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes[0][0].transAxes)
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    fig.suptitle((title + "\n" if title else "") + "mean over seeds, band = 95% interval of the mean", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
