"""Plots of the demo: one run's training curves (`plot_run`) and CAPO vs GRPO over seeds (`plot_comparison`).

matplotlib is imported inside the functions (Agg backend), so importing this module costs nothing.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from capo_jax.metrics import read_metrics

# The panels of `plot_run`: (title, [(metric key, label, style)]).
RUN_PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("answer accuracy", (("reward/outcome_accuracy", "train (rollouts)", "-"), ("eval/accuracy", "held-out eval (greedy)", "o-"))),
    ("held-out wrong-step fraction", (("eval/step_error_rate", "eval: true wrong steps / steps", "o-"),)),
    ("mean reward", (("reward/mean", "mean sequence reward", "-"),)),
    ("fraction of tokens penalised", (("reward/frac_tokens_penalized", "tokens in voted-wrong steps", "-"),)),
)

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


def plot_run(workdir: str, out_png: str | None = None) -> str:
    """Plot a run's training curves from `<workdir>/metrics.jsonl` into a PNG (default `<workdir>/curves.png`); returns its path."""
    rows = read_metrics(workdir)
    out_png = out_png or os.path.join(workdir, "curves.png")
    panels = []
    for title, lines in RUN_PANELS:
        present = [(series(rows, key), label, style) for key, label, style in lines]
        present = [p for p in present if p[0][0].size]
        if present:
            panels.append((title, present))
    plt = _pyplot()
    n = max(len(panels), 1)
    cols = 2 if n > 1 else 1
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, (title, present) in zip(flat, panels):
        for (xs, ys), label, style in present:
            ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        flat[0].text(0.5, 0.5, f"no known metrics in {len(rows)} rows", ha="center", va="center")
        flat[0].set_axis_off()
    for ax in flat[len(panels) if panels else 1:]:
        ax.set_axis_off()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def mean_band(curves: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over curves at the steps every curve has (population std; 0 for one curve)."""
    if not curves:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    common = set(int(s) for s in curves[0][0])
    for xs, _ in curves[1:]:
        common &= set(int(s) for s in xs)
    steps = np.asarray(sorted(common), np.int64)
    if not steps.size:
        return steps, np.zeros(0), np.zeros(0)
    stacked = np.stack([np.asarray([dict(zip(map(int, xs), ys))[int(s)] for s in steps], np.float64) for xs, ys in curves])
    return steps, stacked.mean(0), stacked.std(0)


def _running_mean(ys: np.ndarray, window: int) -> np.ndarray:
    if ys.size == 0 or window <= 1:
        return ys
    c = np.cumsum(np.insert(ys, 0, 0.0))
    out = np.empty_like(ys)
    for i in range(ys.size):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_comparison(results: Mapping[str, Any], out_png: str) -> str:
    """Plot eval accuracy, wrong-step fraction and train accuracy against step: mean over seeds per mode, +-1 std band.

    `results` is the `compare.json` object: `runs` is a list of dicts with `mode`, `ok`, `eval_steps`,
    `eval_accuracy`, `eval_wrong_step_frac`, `train_steps`, `train_outcome_accuracy`; optional
    `bootstrap_eval` ({accuracy, step_error_rate}, drawn at step 0) and `threshold` (a dashed line).
    """
    runs = [r for r in results.get("runs", []) if r.get("ok")]
    boot = results.get("bootstrap_eval") or {}
    panels = (
        ("held-out accuracy (greedy)", "eval_steps", "eval_accuracy", "accuracy", 1),
        ("held-out wrong-step fraction", "eval_steps", "eval_wrong_step_frac", "step_error_rate", 1),
        ("train outcome accuracy (5-step running mean)", "train_steps", "train_outcome_accuracy", None, 5),
    )
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), squeeze=False)
    modes = sorted({r["mode"] for r in runs})
    for ax, (title, xkey, ykey, boot_key, window) in zip(axes[0], panels):
        for mode in modes:
            curves = []
            for r in runs:
                if r["mode"] != mode:
                    continue
                xs, ys = list(r.get(xkey) or []), list(r.get(ykey) or [])
                if boot_key is not None and isinstance(boot.get(boot_key), (int, float)) and 0 not in xs:
                    xs, ys = [0] + xs, [float(boot[boot_key])] + ys
                if xs:
                    curves.append((xs, _running_mean(np.asarray(ys, np.float64), window)))
            steps, mean, std = mean_band(curves)
            if not steps.size:
                continue
            color = MODE_COLORS.get(mode)
            ax.plot(steps, mean, "o-" if boot_key else "-", color=color, markersize=3,
                    label=f"{mode} (n={len(curves)})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        if boot_key == "accuracy" and isinstance(results.get("threshold"), (int, float)):
            ax.axhline(float(results["threshold"]), color="gray", ls="--", lw=1, label="threshold")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not runs:
        axes[0][0].text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("CAPO vs GRPO on the arithmetic demo: mean over seeds, band = +-1 std")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
