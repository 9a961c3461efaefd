"""`python -m capo_jax.train --config configs/X.py [--config.a.b=v ...] [--workdir DIR]`: run CAPO end to end.

Running the same command again with the same workdir resumes from the latest checkpoint;
SIGTERM (a preempted TPU VM) checkpoints and exits cleanly.
"""
from __future__ import annotations

import logging
import sys

import ml_collections

from capo_jax.config import ConfigError, parse_args
from capo_jax.metrics import silence_torch_advisory


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """Join the multi-process job the config and environment describe, before any device is touched
    (capo_jax.distributed: Cloud TPU metadata, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    and the distributed_* keys). Returns whether it did."""
    from capo_jax.distributed import initialize

    return initialize(str(config.distributed), coordinator=str(config.distributed_coordinator),
                      num_processes=int(config.distributed_num_processes), process_id=int(config.distributed_process_id))


DEMO_COMMAND = "python -m capo_jax.train --config configs/demo.py"
EXAMPLES = f"""examples:
  # the embedded demo: bootstraps a tiny policy, then CAPO with the rule critic (runs on a CPU)
  {DEMO_COMMAND}
  # a paper setup: your policy, a GenPRM critic and training problems, from local folders
  python -m capo_jax.train --config configs/qwen2.5_1.5b.py --workdir runs/qwen \\
      --config.policy.path=/ckpt/Qwen2.5-1.5B --config.critic.path=/ckpt/Qwen2.5-72B-Instruct \\
      --config.data.path=/data/math_train.jsonl"""


def usage() -> str:
    """The help text: the command, what it does, one line per config section, and two examples."""
    from capo_jax.config import describe_sections

    rows = describe_sections()
    width = max(len(name) for name, _ in rows[1:])
    lines = ["usage: python -m capo_jax.train --config configs/X.py [--config.<section>.<key>=VALUE ...] [--workdir DIR]", "",
             "Runs CAPO end to end. The same command again resumes from the workdir's newest checkpoint; SIGTERM",
             "checkpoints and exits.", "",
             "config sections (each key with its default and meaning: capo_jax/config.py):"]
    for name, line in rows:
        lines.append(f"  {name:<{width}}  {line}" if len(name) <= width else f"  {name}\n  {'':<{width}}  {line}")
    return "\n".join(lines + ["", EXAMPLES])


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, validate the config and train; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    silence_torch_advisory()
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        print(f"\nno --config given: for the demo run  {DEMO_COMMAND}", file=sys.stderr)
        return 2
    given_file = any(a == "--config" or a.startswith("--config=") for a in argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices on CPU machines
    from capo_jax.checkpoint import CheckpointError
    from capo_jax.lock import WorkdirBusy

    try:
        config, rest = parse_args(argv)
        if rest:
            raise ConfigError(f"unexpected arguments {rest}: use --config FILE, --config.<key>=<value>, --workdir DIR")
        initialize_distributed(config)
        from capo_jax.rl.loop import Run, StopTraining

        run = Run(config)
    except ConfigError as exc:
        hint = "" if given_file else f" (no --config file given, so the schema's defaults apply; for the demo: {DEMO_COMMAND})"
        print(f"config error: {exc}{hint}", file=sys.stderr)
        return 2
    except (CheckpointError, WorkdirBusy) as exc:
        print(f"[train] {exc}", file=sys.stderr)
        return 2
    try:
        step = run.train()
    except StopTraining as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 3
    print(f"[train] finished at step {step}; checkpoints in {run.checkpointer.directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
