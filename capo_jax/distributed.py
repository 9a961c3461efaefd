"""Joining a multi-process JAX job: on Cloud TPU from the TPU metadata, elsewhere from a coordinator address,
a process count and a process id given by the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) or by the config keys `distributed_coordinator`, `distributed_num_processes` and
`distributed_process_id`, which override them. CPU jobs get gloo collectives.

Call `initialize` before anything touches a device: JAX fixes its backends on first use.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Mapping

from capo_jax.config import ConfigError

MODES = ("auto", "on", "off")

# (environment variable, config key) of each setting.
COORDINATOR = ("JAX_COORDINATOR_ADDRESS", "distributed_coordinator")
NUM_PROCESSES = ("JAX_NUM_PROCESSES", "distributed_num_processes")
PROCESS_ID = ("JAX_PROCESS_ID", "distributed_process_id")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """The job this process joins; None marks a setting neither the config nor the environment gives."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None

    def given(self) -> bool:
        """Whether any of the three settings is given."""
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def _names(setting: tuple[str, str]) -> str:
    return f"{setting[0]} (or --config.{setting[1]})"


def _int_setting(setting: tuple[str, str], config_value: int, env: Mapping[str, str]) -> int | None:
    """The config value when set (>= 0), else the environment's, else None."""
    if int(config_value) >= 0:
        return int(config_value)
    text = env.get(setting[0], "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{setting[0]}={text!r} is not an integer: set it to a whole number or unset it") from None


def job_spec(coordinator: str = "", num_processes: int = -1, process_id: int = -1,
             env: Mapping[str, str] | None = None) -> JobSpec:
    """The settings from the config ("" / -1 = not set) over the environment; checks the values that are given."""
    env = os.environ if env is None else env
    address = str(coordinator).strip() or env.get(COORDINATOR[0], "").strip() or None
    spec = JobSpec(address, _int_setting(NUM_PROCESSES, num_processes, env), _int_setting(PROCESS_ID, process_id, env))
    if spec.coordinator is not None:
        host, sep, port = spec.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"coordinator address {spec.coordinator!r} is not HOST:PORT: set {_names(COORDINATOR)} "
                              "to process 0's address and a free port, e.g. 10.0.0.2:1234")
    if spec.num_processes is not None and spec.num_processes < 1:
        raise ConfigError(f"process count {spec.num_processes} must be >= 1: fix {_names(NUM_PROCESSES)}")
    if spec.process_id is not None:
        if spec.process_id < 0 or (spec.num_processes is not None and spec.process_id >= spec.num_processes):
            raise ConfigError(f"process id {spec.process_id} is outside 0..{(spec.num_processes or 1) - 1}: "
                              f"give each process its own id from 0 to the process count - 1 in {_names(PROCESS_ID)}")
    return spec


def tpu_hosts(env: Mapping[str, str] | None = None) -> int:
    """How many hosts TPU_WORKER_HOSTNAMES lists (0 off Cloud TPU)."""
    env = os.environ if env is None else env
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()])


def _has_tpu_chips() -> bool:
    try:
        from jax._src import hardware_utils  # the check JAX itself runs before loading libtpu

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a JAX without that helper: fall back to the environment
        return False


def on_cloud_tpu(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is a Cloud TPU VM (TPU metadata in the environment, or TPU chips on the PCI bus)."""
    env = os.environ if env is None else env
    return tpu_hosts(env) > 0 or bool(env.get("TPU_ACCELERATOR_TYPE")) or _has_tpu_chips()


def cpu_platform(env: Mapping[str, str] | None = None) -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS (or jax_platforms) names cpu first, or no accelerator is present."""
    env = os.environ if env is None else env
    import jax

    platforms = str(jax.config.jax_platforms or env.get("JAX_PLATFORMS", "") or "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not on_cloud_tpu(env) and not glob.glob("/dev/nvidia[0-9]*")


def initialize(mode: str, *, coordinator: str = "", num_processes: int = -1, process_id: int = -1,
               env: Mapping[str, str] | None = None) -> bool:
    """Join the job (`on`; `auto`: when a setting is given or TPU_WORKER_HOSTNAMES lists several hosts); returns whether it did.

    Off Cloud TPU every setting must be given; on Cloud TPU the missing ones come from the TPU metadata.
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise ConfigError(f"distributed={mode!r} is not one of {list(MODES)}: set --config.distributed=auto")
    if mode == "off":
        return False
    spec = job_spec(coordinator, num_processes, process_id, env)
    if mode == "auto" and not spec.given() and tpu_hosts(env) <= 1:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    tpu = on_cloud_tpu(env)
    if spec.given() and not tpu:
        missing = [_names(s) for s, v in ((COORDINATOR, spec.coordinator), (NUM_PROCESSES, spec.num_processes),
                                          (PROCESS_ID, spec.process_id)) if v is None]
        if missing:
            raise ConfigError(f"a multi-process job needs the coordinator, the process count and this process's id; "
                              f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                              "set all three on every process (or --config.distributed=off for one process)")
    if cpu_platform(env):  # cross-process collectives on CPU (JAX's own default has changed between versions)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id)
    except ValueError as exc:  # JAX found no cluster to take the missing settings from
        raise ConfigError(f"distributed={mode}: {exc} Set {_names(COORDINATOR)}, {_names(NUM_PROCESSES)} and "
                          f"{_names(PROCESS_ID)} on every process") from None
    return True
