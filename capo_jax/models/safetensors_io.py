"""Read and write the safetensors format with NumPy memory maps (bfloat16 through ml_dtypes); no pickle anywhere.

Reading validates the header against the file size, so a truncated or corrupt file is reported by name.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read (truncated, corrupt, unsupported dtype)."""


class SafeTensorsFile:
    """One safetensors file, memory-mapped; `get(name)` returns a read-only NumPy view (no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: {size} bytes, too short to be a safetensors file (truncated?)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: header of {n} bytes does not fit in a {size}-byte file "
                    "(truncated, or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_size = size - self._start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise SafetensorsError(f"{self.path}: bad header entry for {name!r}: {e!r} ({err})") from err
            if min(shape, default=0) < 0 or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} offsets {begin}..{end} do not match "
                                       f"shape {shape} of {e['dtype']}")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} ends at byte {end} but the data section has "
                                       f"only {data_size} bytes: the file is truncated; re-copy or re-save it")
            self.entries[name] = (dtype, shape, begin, end)
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only array backed by the memory map."""
        dtype, shape, begin, end = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._start + begin:self._start + end]
        return raw.view(dtype).reshape(shape)


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors dtype code ('F32', 'BF16', ...) of a NumPy dtype."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError as e:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors") from e


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write (name, array) pairs to `path` (atomically via a temporary file); returns bytes of tensor data."""
    arrays = dict(tensors)
    specs = [(name, a.shape, a.dtype) for name, a in arrays.items()]
    return write_safetensors_streaming(path, specs, arrays.__getitem__, metadata)


def write_safetensors_streaming(path: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...], Any]],
                                produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write tensors described by (name, shape, dtype) whose data `produce(name)` returns one at a time, so only
    one tensor need be in memory; atomic via a temporary file. Returns bytes of tensor data."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            a = np.ascontiguousarray(produce(name))
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: produced {a.shape} {a.dtype}, declared {tuple(shape)} {dtype}")
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
    return offset
