"""python -m capo_jax.plan --config configs/X.py --topology v5e-16 [--config.a.b=v ...]

Compiles the config's programs (train step, rollout reshard / prefill / decode, critic prefill / decode) for the
named TPU slice on this host (no TPU needed, only libtpu) and prints per device: memory in each phase against
HBM, and per program the FLOPs, HBM bytes and collective bytes with their time bounds.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host code on the CPU; the TPU is only a compilation target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main(argv: list[str] | None = None) -> int:
    from capo_jax import config as config_lib
    from capo_jax.plan import topology

    parser = argparse.ArgumentParser(prog="python -m capo_jax.plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="", help="slice: v5e-16, v5e:4x4, v4-8, v5p-16, v6e-8 "
                        "(default: the config's mesh.topology)")
    parser.add_argument("--programs", default="train,rollout,critic", help="phases to compile (comma-separated)")
    parser.add_argument("--layers", type=int, default=None, help="compile the policy with this many layers")
    parser.add_argument("--critic-layers", type=int, default=None, help="compile the critic with this many layers")
    parser.add_argument("--alternatives", type=int, default=2,
                        help="recompilations to try when a phase does not fit (0 = none)")
    parser.add_argument("--hlo-dir", default="", help="write each program's optimised HLO text here")
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, rest = config_lib.parse_args(argv)
    except config_lib.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(rest)
    name = args.topology or config.mesh.topology
    if not name:
        print("error: no slice named: pass --topology (e.g. v5e-16) or set mesh.topology in the config",
              file=sys.stderr)
        return 2
    if not topology.libtpu_available():
        print(f"error: compiling for a TPU slice needs libtpu: {topology.INSTALL_HINT}", file=sys.stderr)
        return 2
    which = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = sorted(set(which) - {"train", "rollout", "critic"})
    if unknown:
        print(f"error: --programs {unknown}: choose from train, rollout, critic", file=sys.stderr)
        return 2
    from capo_jax.plan.planner import make_plan
    from capo_jax.plan.report import render

    try:
        plan = make_plan(config, name, which=which, layers=args.layers, critic_layers=args.critic_layers,
                         alternatives=args.alternatives)
    except (ValueError, config_lib.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config_name = next((a.split("=", 1)[-1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                        if a == "--config" or a.startswith("--config=")), "the default config")
    print(render(plan, config_name))
    if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        for prog in (p for p in plan.programs if p.text):
            with open(os.path.join(args.hlo_dir, prog.name.replace(" ", "_") + ".hlo"), "w") as f:
                f.write(prog.text)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
