"""TPU slices by name (`v5e-16`, `v5e:4x4`, `v4-8`, `v5p-16`, `v6e-8`), their per-chip limits, and their devices
for ahead-of-time compilation on any host (needs `libtpu`, no TPU).

Limits are the published per-chip figures (sources in docs/tpu.md): peak bf16 FLOP/s, HBM bytes and bandwidth,
and ICI bandwidth counted as what one chip can send (half the published bidirectional figure). Slice names
follow Cloud TPU's accelerator types: v5e/v6e count chips, v4/v5p count TensorCores (two per chip).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

INSTALL_HINT = "pip install libtpu==0.0.42.1  (the version jax[tpu]==0.10.2 pins; no TPU needed to compile)"
GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip limits."""

    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s one chip can send over all its ICI links
    cores_per_chip: int  # TensorCores: the unit v4/v5p slice names count
    torus_dims: int


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1.2e12, 6 * 45e9, 2, 3),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 400e9 / 2, 1, 2),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2.765e12, 1200e9 / 2, 2, 3),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1.638e12, 800e9 / 2, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}
# chips -> torus shape of the slices Cloud TPU offers
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A named slice: its chip, the topology string libtpu takes (`v5e:4x4`), and its chip count."""

    name: str
    chip: Chip
    topology: str
    chips: int

    def describe(self) -> str:
        return f"{self.name} ({self.topology}, {self.chips} {self.chip.name} chips)"


def parse_slice(name: str) -> Slice:
    """`v5e-16` / `v5litepod-16` / `v5e:4x4` / `v4-8` / `v5p-16` / `v6e-8` -> Slice; a clear error otherwise."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?[-_:](\d+(?:x\d+)*)", text)
    if m is None:
        raise ValueError(f"topology {name!r} is not a slice name: use e.g. 'v5e-16', 'v5e:4x4', 'v4-8', 'v5p-16', "
                         f"'v6e-8'")
    family = _ALIASES.get(m.group(1), m.group(1))
    if family not in CHIPS:
        raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
    chip = CHIPS[family]
    spec = m.group(2)
    if "x" in spec:
        dims = [int(d) for d in spec.split("x")]
        if len(dims) != chip.torus_dims:
            raise ValueError(f"topology {name!r}: a {family} slice has a {chip.torus_dims}D shape like "
                             f"{'2x2x2' if chip.torus_dims == 3 else '4x4'}")
        return Slice(name=f"{family}:{spec}", chip=chip, topology=f"{family}:{spec}", chips=math.prod(dims))
    count = int(spec)
    if count % chip.cores_per_chip:
        raise ValueError(f"topology {name!r}: {family} slice names count TensorCores ({chip.cores_per_chip} per "
                         f"chip), so the number must be a multiple of {chip.cores_per_chip}")
    chips = count // chip.cores_per_chip
    shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"topology {name!r}: no standard {family} slice has {chips} chips; give the shape "
                         f"instead, e.g. '{family}:{next(iter(shapes.values()))}'")
    return Slice(name=f"{family}-{count}", chip=chip, topology=f"{family}:{shapes[chips]}", chips=chips)


def require_libtpu() -> None:
    """Raise a RuntimeError with the install command when libtpu cannot be imported."""
    try:
        import libtpu  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"compiling for a TPU slice needs libtpu, which is not installed: {INSTALL_HINT}") from exc


def libtpu_available() -> bool:
    try:
        require_libtpu()
    except RuntimeError:
        return False
    return True


def devices(slice_: Slice | str) -> list[Any]:
    """The slice's devices for ahead-of-time compilation (one per TensorCore the runtime exposes)."""
    slice_ = parse_slice(slice_) if isinstance(slice_, str) else slice_
    require_libtpu()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu (tests, planners)
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(topology_name=slice_.topology, platform="tpu")
    except Exception as exc:  # libtpu's own message says what is wrong with the shape
        raise ValueError(f"libtpu refused topology {slice_.topology!r}: {exc}") from exc
    return list(topo.devices)


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """Per-device limits (a device is a chip, or a TensorCore where the topology exposes each core)."""

    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float


def device_limits(slice_: Slice, num_devices: int) -> DeviceLimits:
    """The chip's limits shared by the devices each chip exposes."""
    per_chip = max(1, num_devices // slice_.chips)
    c = slice_.chip
    return DeviceLimits(c.peak_flops / per_chip, c.hbm_bytes / per_chip, c.hbm_bandwidth / per_chip,
                        c.ici_bandwidth / per_chip)
