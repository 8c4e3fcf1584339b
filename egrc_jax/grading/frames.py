"""Message framing between `GraderPool` and its workers: JSON only, never pickle.

A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON. Readers refuse a
frame longer than their limit before buffering it, so a worker cannot make the parent hold
more than MAX_REPLY_BYTES of its output.
"""

from __future__ import annotations

import json
import os
import struct

HEADER = struct.Struct(">I")
MAX_TASK_BYTES = 64 * 2**20  # a task is one answer and one gold: far below this
MAX_REPLY_BYTES = 2**20  # a reply is [idx, bool, <=300 chars]: the parent refuses more


def encode_frame(obj) -> bytes:
  """One message as bytes: length header + JSON."""
  data = json.dumps(obj).encode()
  return HEADER.pack(len(data)) + data


class FrameReader:
  """Incremental frame decoder for bytes read from a pipe as they arrive (never blocks)."""

  def __init__(self, max_bytes: int):
    self.max_bytes, self._buf = max_bytes, bytearray()

  def feed(self, data: bytes) -> list:
    """The messages completed by `data`; raises ValueError on an oversized or bad frame."""
    self._buf += data
    out = []
    while len(self._buf) >= HEADER.size:
      (n,) = HEADER.unpack_from(self._buf)
      if n > self.max_bytes:
        raise ValueError(f"frame of {n} bytes > {self.max_bytes}")
      if len(self._buf) < HEADER.size + n:
        break
      payload = bytes(self._buf[HEADER.size : HEADER.size + n])
      del self._buf[: HEADER.size + n]
      out.append(json.loads(payload))
    return out


def write_all(fd: int, data: bytes) -> None:
  """os.write until every byte is out (a pipe may take a large write in pieces)."""
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view) :]
