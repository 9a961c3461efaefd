"""`python -m capo_jax.export --workdir DIR [--step N] --out HF_DIR [--dtype float32|bfloat16]`.

Writes the trained policy of a capo_jax workdir (its orbax checkpoint, latest or `--step`) as a
Hugging Face folder with the tokenizer. `capo_jax.models.from_pretrained(folder)` loads it back in
JAX; transformers' AutoModelForCausalLM loads it too, given PyTorch. The workdir holds everything
needed: the policy's HF config and tokenizer files sit in `policy_hf/`.
"""
from __future__ import annotations

import argparse
import os
import sys

from capo_jax.checkpoint import POLICY_HF_DIR, CheckpointError, load_policy
from capo_jax.metrics import silence_torch_advisory


TORCH_INSTALL = "pip install torch==2.13.0"  # the pinned CPU wheel the project tests with (never unpinned)


def load_hint(folder: str) -> str:
    """How to load an exported folder: in JAX with capo_jax, or in transformers (which needs PyTorch)."""
    return (f"load it in JAX with capo_jax.models.from_pretrained({folder!r}), or in PyTorch with "
            f"transformers.AutoModelForCausalLM.from_pretrained({folder!r}) after `{TORCH_INSTALL}` "
            "(transformers needs PyTorch for models; never install torch unpinned)")


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None) -> tuple[str, int]:
    """Export checkpoint `step` (None: the latest) of `workdir` to `out`; returns (out, step)."""
    from capo_jax.models import save_pretrained

    model, step = load_policy(workdir, step)
    save_pretrained(model, out, tokenizer_dir=os.path.join(workdir, POLICY_HF_DIR), dtype=dtype)
    return out, step


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    silence_torch_advisory()
    parser = argparse.ArgumentParser(prog="python -m capo_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the training workdir (config.json, policy_hf/, checkpoints/)")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="stored dtype (default: the master weights')")
    args = parser.parse_args(argv)
    try:
        out, step = export(args.workdir, args.out, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.workdir} to {out}")
    print(load_hint(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
