"""A grading worker process: `python -P -m egrc_jax.grading.worker VERIFY_TIMEOUT_S MEMORY_MB`.

`GraderPool` starts each worker as its own interpreter over pipes (never `multiprocessing`:
a spawn child re-imports the caller's `__main__`, so a script that makes a pool at top level,
without an `if __name__ == "__main__":` guard, would fail in every worker). `-P` keeps the
caller's working directory off `sys.path`, so a stray `math.py` or `egrc_jax/` there is not
imported either.

Protocol (JSON frames only, never pickle, both ways; see `frames.py`): the worker sends
"ready" once its imports are warm, then answers each task [idx, pred, gold] with
[idx, correct, error] (error None or a short string); a null task, or the end of stdin (the
parent is gone), stops it. The frames travel on private copies of the stdin/stdout
descriptors: fd 1 is pointed at stderr, so a library's stray print cannot corrupt a frame,
and fd 0 at /dev/null.
"""

from __future__ import annotations

import json
import os
import sys

from egrc_jax.grading.frames import HEADER, MAX_TASK_BYTES, encode_frame, write_all


def _read_exact(fd: int, n: int) -> bytes | None:
  """n bytes from fd, or None at end of input."""
  chunks, left = [], n
  while left:
    chunk = os.read(fd, left)
    if not chunk:
      return None
    chunks.append(chunk)
    left -= len(chunk)
  return b"".join(chunks)


def _read_task(fd: int):
  header = _read_exact(fd, HEADER.size)
  if header is None:
    return None
  (n,) = HEADER.unpack(header)
  if n > MAX_TASK_BYTES:
    raise ValueError(f"task frame of {n} bytes > {MAX_TASK_BYTES}")
  payload = _read_exact(fd, n)
  return None if payload is None else json.loads(payload)


def serve(verify_timeout_s: int, memory_mb: int) -> None:
  """The worker loop (see the module docstring)."""
  import resource

  task_in, reply_out = os.dup(0), os.dup(1)
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  os.dup2(2, 1)  # stray prints go to stderr, never into the reply stream
  # Written before the limit is set: under it, formatting a message may itself fail. Best
  # effort: far too small a limit can also break the interpreter otherwise (SystemError, hang).
  no_memory = (
    f"\negrc_jax grading worker: out of memory while loading math-verify under its {memory_mb} "
    "MiB address-space limit; raise GraderPool(worker_memory_mb=...)\n"
  ).encode()
  limit = memory_mb * 2**20
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a runaway sympy raises MemoryError
  try:
    from egrc_jax.grading.equivalence import is_equivalent

    is_equivalent("1", "\\frac{2}{2}", verify_timeout_s)  # warm the sympy/ANTLR imports
  except MemoryError:
    os.write(2, no_memory)
    os._exit(3)
  except ImportError as e:
    sys.exit(
      f"egrc_jax grading worker: cannot import math-verify ({e}); install it with "
      "pip install 'math-verify[antlr4_13_2]==0.9.0' (see setup.py)"
    )
  write_all(reply_out, encode_frame("ready"))
  while True:
    task = _read_task(task_in)
    if task is None:
      return
    idx, pred, gold = task
    try:
      reply = [idx, bool(is_equivalent(pred, gold, verify_timeout_s)), None]
    except Exception as e:  # noqa: BLE001 -- any failure is a wrong answer, never a dead pool
      reply = [idx, False, f"{type(e).__name__}: {e}"[:300]]
    write_all(reply_out, encode_frame(reply))


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: python -P -m egrc_jax.grading.worker VERIFY_TIMEOUT_S MEMORY_MB")
  serve(int(argv[0]), int(argv[1]))


if __name__ == "__main__":
  main(sys.argv[1:])
