"""Training metrics: a progress bar (tqdm on a terminal, plain lines otherwise), TensorBoard, JSONL, phase timers.

`MetricsWriter.write(step, metrics)` sends one step's scalars to every enabled sink and prints every
evaluation (`eval/...` keys) as one line, next to the bootstrap's (step 0) numbers when there are any;
`PhaseTimer` measures the wall time of the loop's phases (rollout, verify, critic, update).

A resumed run passes `keep_through=<restored step>`: the rows logged after it by the interrupted
run are dropped from `metrics.jsonl` (rewritten atomically) and TensorBoard is told to purge them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping

# The numbers the progress bar shows (when present), short name -> metric key.
PROGRESS_KEYS = {
    "acc": "reward/outcome_accuracy",
    "R": "reward/mean",
    "pen": "reward/frac_tokens_penalized",
    "loss": "train/loss",
    "kl": "train/kl",
    "gn": "train/grad_norm",
    "s/step": "time/step",
}


TORCH_ADVISORY = "PyTorch was not found"  # transformers' import-time notice; capo_jax runs its models in JAX


class _DropTorchAdvisory(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TORCH_ADVISORY)


def silence_torch_advisory() -> None:
    """Drop transformers' "PyTorch was not found" notice (capo_jax needs torch for nothing but loading an export in
    transformers); every other transformers message still shows. Call before transformers is imported."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropTorchAdvisory) for f in logger.filters):
        logger.addFilter(_DropTorchAdvisory())


EVAL_PREFIX = "eval/"
BOOTSTRAP_STEP = 0  # an evaluation logged at this step is the bootstrap's: the reference for later ones
EVAL_SIZE_SUFFIXES = ("problems", "pairs")  # eval keys that count items (shown as integers, without a reference)


def _scalar(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v


class MetricsWriter:
    """Writes each step's scalar metrics to TensorBoard, `metrics.jsonl` and the console."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, tensorboard: bool = True,
                 jsonl: bool = True, progress: bool = True, stream: Any = None, keep_through: int | None = None) -> None:
        """`keep_through`: drop the rows of steps after it (the step a resumed run restored; -1 drops every row)."""
        os.makedirs(workdir, exist_ok=True)
        self.stream = stream if stream is not None else sys.stderr
        path = os.path.join(workdir, "metrics.jsonl")
        self._reference: dict[str, float] = {}
        if jsonl:
            if keep_through is not None:
                truncate_jsonl(path, keep_through)
            self._reference = _eval_reference(path)
        self._jsonl = open(path, "a", encoding="utf-8") if jsonl else None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops what earlier event files hold from this step on (the interrupted run's tail)
            purge = None if keep_through is None else max(int(keep_through) + 1, 0)
            # a unique, time-ordered file name: a writer started within the same second must not overwrite the last one
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge, filename_suffix=f".{time.time_ns()}")
        self._bar = None
        self._total = int(total_steps)
        if progress and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, initial=int(initial_step), file=self.stream, dynamic_ncols=True, desc="capo")
        self._progress = progress

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step's metrics (non-scalar values are skipped; NaN/inf go to JSONL as null)."""
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        scalars = {k: v for k, v in scalars.items() if v is not None}
        if self._jsonl is not None:
            row = {"step": int(step), "time": time.time()}
            row.update({k: (v if math.isfinite(v) else None) for k, v in scalars.items()})
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        short = {name: scalars[key] for name, key in PROGRESS_KEYS.items() if key in scalars}
        if self._bar is not None:
            self._bar.n = int(step)
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)
            self._bar.refresh()
        elif self._progress:
            body = " ".join(f"{k}={v:.4g}" for k, v in short.items())
            print(f"step {int(step)}/{self._total} {body}", file=self.stream, flush=True)
        evals = {k: v for k, v in scalars.items() if k.startswith(EVAL_PREFIX)}
        if evals:
            if int(step) == BOOTSTRAP_STEP:
                self._reference = evals
            if self._progress:
                self.log(eval_line(int(step), evals, self._reference))

    def log(self, message: str) -> None:
        """A free-form line (kept clear of the progress bar)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase of one step: `with timer("rollout"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """`time/<phase>` for each phase and `time/step` for their sum."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        return out


def _fmt(values: Mapping[str, float], key: str) -> str:
    v = values[key]
    se = values.get(key + "_se")
    return f"{v:.3g}" + (f"±{se:.2g}" if se is not None else "")


def eval_line(step: int, evals: Mapping[str, float], reference: Mapping[str, float] | None = None) -> str:
    """`eval@20 sampled_accuracy 0.47±0.03 (bootstrap 0.38±0.03) ...`: every `eval/` value, its `_se` beside it,
    and the bootstrap's (step 0) value of the same key as reference (sizes such as `problems` stand alone)."""
    ref = reference if reference and step != BOOTSTRAP_STEP else {}
    parts = [f"eval@{step}" + (" (bootstrap)" if step == BOOTSTRAP_STEP else "")]
    for key in evals:
        if key.endswith("_se") and key[:-3] in evals:
            continue
        if key.endswith(EVAL_SIZE_SUFFIXES):  # how many problems / responses: a size, not a score
            parts.append(f"{key[len(EVAL_PREFIX):]} {evals[key]:.0f}")
            continue
        part = f"{key[len(EVAL_PREFIX):]} {_fmt(evals, key)}"
        if key in ref:
            part += f" (bootstrap {_fmt(ref, key)})"
        parts.append(part)
    return " ".join(parts)


def truncate_jsonl(path: str, keep_through: int) -> int:
    """Drop the rows of steps after `keep_through` (and lines a killed run cut short) from a JSONL file, rewriting it
    atomically (temp file + os.replace); returns how many lines went."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if line.endswith("\n") and isinstance(step, (int, float)) and step <= keep_through:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _eval_reference(path: str) -> dict[str, float]:
    """The `eval/` values of the bootstrap row (step 0) of a metrics file, {} when it has none."""
    if not os.path.exists(path):
        return {}
    for row in _jsonl_rows(path, strict=False):
        if row.get("step") == BOOTSTRAP_STEP and any(k.startswith(EVAL_PREFIX) for k in row):
            return {k: float(v) for k, v in row.items() if k.startswith(EVAL_PREFIX) and v is not None}
    return {}


def _jsonl_rows(path: str, strict: bool) -> list[dict]:
    """The JSON objects of a JSONL file; a line that is not one raises when `strict`, else is skipped (a line
    cut short by a killed run)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if strict:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
                continue
            if isinstance(row, dict):
                rows.append(row)
            elif strict:
                raise ValueError(f"{path}:{n}: not a JSON object")
    return rows


def read_jsonl(workdir: str) -> list[dict]:
    """Every row of a run's `metrics.jsonl` as written (a resumed run may repeat steps); [] before the first.
    Strict: a malformed line raises (tests and notebooks should see it)."""
    path = os.path.join(workdir, "metrics.jsonl")
    return _jsonl_rows(path, strict=True) if os.path.exists(path) else []


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `<workdir>/metrics.jsonl` sorted by step; a step logged twice (a resumed run) keeps its last row."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {workdir!r}: has the run started?")
    by_step = {int(row["step"]): row for row in _jsonl_rows(path, strict=False) if "step" in row}
    return [by_step[s] for s in sorted(by_step)]
