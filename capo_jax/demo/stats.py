"""Statistics of a comparison over seeds: means with Student-t 95% intervals, and paired differences with p-values.

Seeds are the unit of replication: each run's number (final accuracy, area under its curve, ...) is one
observation, so the interval of a mode's mean is t-based over its seeds, and CAPO vs GRPO is a paired
comparison over the seeds both finished (same data order, same rollout and critic seeds), tested with the
paired t-test and, since one diverging run can swamp a mean over eight seeds, with the Wilcoxon signed-rank
test too.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], np.float64)


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean, sample std and the Student-t interval of the mean of the finite values (None where undefined)."""
    from scipy import stats

    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                      level: float = 0.95) -> dict[str, float | int | None]:
    """a - b over the keys (seeds) both hold a finite value for: mean, t interval, two-sided p-values of the paired
    t-test (`p`) and of the Wilcoxon signed-rank test (`p_rank`, exact for small samples)."""
    from scipy import stats

    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None
                  and math.isfinite(float(a[k])) and math.isfinite(float(b[k])))
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    out = dict(mean_ci(diffs, level))
    out["p"] = out["p_rank"] = None
    if len(diffs) >= 2:
        d = np.asarray(diffs)
        if float(d.std(ddof=1)) == 0.0:
            out["p"] = 1.0 if float(d.mean()) == 0.0 else 0.0
        else:
            out["p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
        out["p_rank"] = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    return out


def fmt_ci(s: Mapping[str, float | int | None], digits: int = 3) -> str:
    """`mean [lo, hi]`, `mean` for one value, `n/a` for none."""
    if s.get("mean") is None:
        return "n/a"
    if s.get("lo") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def fmt_p(p: float | None) -> str:
    """A p-value for a table: `p < 0.001` below that, else three decimals; `n/a` when undefined."""
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
