"""A read-only, memory-mapped view of one .safetensors file, bfloat16 included.

`safetensors.safe_open(framework="numpy")` cannot return bfloat16 tensors (numpy has no
such dtype), and the R1-distill checkpoints are bfloat16. The format is simple enough to
read directly: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian bytes. Each
tensor comes back as a zero-copy `np.memmap` view (bfloat16 through `ml_dtypes`), so a
loader touches only the bytes it slices. The header is validated against the file size up
front, so a truncated download fails here, naming the file, not deep inside a reshape.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class CorruptSafetensorsError(ValueError):
  """The file is truncated or its header does not describe its contents."""


class SafetensorsFile:
  """`keys()`, `shape(name)`, `dtype(name)`, `get(name) -> np.ndarray` (a memmap view)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    bad = lambda why: CorruptSafetensorsError(
      f"{self.path}: truncated or corrupt safetensors file ({why}); re-download or re-export it"
    )
    if size < 8:
      raise bad(f"only {size} bytes")
    with open(self.path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > min(_MAX_HEADER, size - 8):
        raise bad(f"header length {n} but file has {size} bytes")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON: {err}") from err
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    data_end = 0
    for name, info in header.items():
      if info.get("dtype") not in _DTYPES:
        raise bad(f"tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
      dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
      begin, end = info["data_offsets"]
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise bad(f"tensor {name!r}: offsets {begin}..{end} do not fit shape {shape} {dtype}")
      self._entries[name] = (dtype, shape, begin, end)
      data_end = max(data_end, end)
    if self._start + data_end > size:
      raise bad(f"header needs {self._start + data_end} bytes but the file has {size}")
    self._mmap = np.memmap(self.path, np.uint8, "r") if size > self._start else None

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def nbytes(self, name: str) -> int:
    _, _, begin, end = self._entries[name]
    return end - begin

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self._entries[name]
    if begin == end:
      return np.zeros(shape, dtype)
    raw = self._mmap[self._start + begin : self._start + end]
    return raw.view(dtype).reshape(shape)
