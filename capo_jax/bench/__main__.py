"""Dispatch `python -m capo_jax.bench NAME [args...]` to `capo_jax.bench.NAME.main(args)`."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

BENCHES = ("sampler", "credit", "train", "load", "peaks")


def summary(name: str) -> str:
    """The first line of a sub-benchmark's docstring, read from its source (importing it would load jax)."""
    spec = importlib.util.find_spec(f"capo_jax.bench.{name}")
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    """The help text: how to call it and one line per sub-benchmark."""
    width = max(map(len, BENCHES))
    lines = ["usage: python -m capo_jax.bench NAME [options]", "",
             "Benchmarks that print throughput next to a peer run (PyTorch) or this machine's peaks, with the load average.",
             "", "NAME is one of:"]
    lines += [f"  {name:<{width}}  {summary(name)}" for name in BENCHES]
    lines += ["", "python -m capo_jax.bench NAME --help lists that benchmark's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the named sub-benchmark; returns its exit status (2 with the help for a missing or unknown name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in BENCHES:
        if argv:
            print(f"unknown benchmark {argv[0]!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(f"capo_jax.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
