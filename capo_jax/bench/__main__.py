"""Dispatch `python -m capo_jax.bench NAME [args...]` to `capo_jax.bench.NAME.main(args)`."""
from __future__ import annotations

import importlib
import sys

BENCHES = ("sampler", "credit", "train", "load")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m capo_jax.bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"capo_jax.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
