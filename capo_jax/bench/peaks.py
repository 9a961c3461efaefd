"""Measure this machine's memory read bandwidth and matmul peaks, the roofline that benchmarks report against.

Run alone with `python -m capo_jax.bench.peaks`; the sampler and train benchmarks call `measure_peaks()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Peaks:
    """Measured peaks: streaming read bandwidth (GB/s) and dense matmul rates (GFLOP/s)."""

    bandwidth_gbs: float  # best of a float32 matrix-vector product and a sum over a buffer >> L3
    matvec_gbs: float  # float32 matrix-vector product (what batch-1 decode does)
    reduce_gbs: float  # plain sum over the same buffer
    f32_gflops: float  # float32 x float32 -> float32 matmul
    bf16_gflops: float  # bfloat16 x bfloat16 -> float32 accumulation (preferred_element_type)
    bf16_plain_gflops: float  # bfloat16 x bfloat16 -> bfloat16 (slow on CPUs without a native path)

    def rows(self) -> list[str]:
        return [
            f"read bandwidth   {self.bandwidth_gbs:8.1f} GB/s  (matvec {self.matvec_gbs:.1f}, sum {self.reduce_gbs:.1f})",
            f"matmul float32   {self.f32_gflops:8.1f} GFLOP/s",
            f"matmul bf16->f32 {self.bf16_gflops:8.1f} GFLOP/s",
            f"matmul bf16      {self.bf16_plain_gflops:8.1f} GFLOP/s",
        ]


def load_average() -> str:
    """This machine's 1, 5 and 15-minute load averages as "1.23 1.45 1.67" ("unknown" where the OS keeps none),
    printed beside every timing: other work on a shared machine skews them."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def best_time(fn: Callable, *args, reps: int = 5) -> float:
    """Best wall time of `reps` calls of a jitted `fn` (after one warm-up call that compiles it)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> tuple[float, float]:
    """(matvec GB/s, reduction GB/s) streaming a float32 buffer of `nbytes`, far larger than the caches."""
    n = int(np.sqrt(nbytes // 4))
    w = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    x = jnp.ones((n,), jnp.float32)
    matvec = best_time(jax.jit(lambda w, x: w @ x), w, x, reps=reps)
    reduce = best_time(jax.jit(lambda w: jnp.sum(w)), w, reps=reps)
    size = w.size * 4
    del w
    return size / matvec / 1e9, size / reduce / 1e9


def measure_matmul(dtype, preferred=None, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a square `size` matmul in `dtype`, accumulating in `preferred` when given."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((size, size), dtype=np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((size, size), dtype=np.float32), dtype)
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=preferred))
    return 2 * size**3 / best_time(fn, a, b, reps=reps) / 1e9


def measure_peaks(quick: bool = False) -> Peaks:
    """Measure all peaks; `quick` uses smaller buffers and fewer repetitions (rougher numbers)."""
    reps = 3 if quick else 5
    matvec, reduce = measure_bandwidth((128 if quick else 256) << 20, reps=reps)
    size = 1024 if quick else 2048
    f32 = measure_matmul(jnp.float32, size=size, reps=reps)
    bf16 = measure_matmul(jnp.bfloat16, jnp.float32, size=size, reps=reps)
    bf16_plain = measure_matmul(jnp.bfloat16, None, size=size, reps=reps)
    return Peaks(max(matvec, reduce), matvec, reduce, f32, bf16, bf16_plain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capo_jax.bench peaks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller buffers, fewer repetitions")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    for row in measure_peaks(args.quick).rows():
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
