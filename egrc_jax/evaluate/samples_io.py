"""samples.jsonl: one JSON object per generated sample, appended per finished prompt batch.

A sample's key is (benchmark, id, sample). Reading keeps the last record of a key (a problem
regenerated after an interruption replaces its older rows). An interrupted write can leave a
partial last line: `read_samples` skips it, and `repair` cuts it off before appending, so the
file stays valid JSONL.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def read_samples(path: str | os.PathLike) -> list[dict]:
  """All well-formed records of a samples file (missing file: []), last record per key."""
  p = pathlib.Path(path)
  if not p.is_file():
    return []
  by_key: dict[tuple, dict] = {}
  with p.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        log.warning("%s:%d is not valid JSON (an interrupted write?); skipping it", p, lineno)
        continue
      by_key[(r["benchmark"], r["id"], r["sample"])] = r
  return list(by_key.values())


def repair(path: str | os.PathLike) -> int:
  """Cut a partial (newline-less) last line off the file; returns the bytes removed."""
  p = pathlib.Path(path)
  if not p.is_file() or p.stat().st_size == 0:
    return 0
  data = p.read_bytes()
  if data.endswith(b"\n"):
    return 0
  keep = data.rfind(b"\n") + 1
  with p.open("r+b") as f:
    f.truncate(keep)
  log.warning("%s: removed a partial last line of %d bytes", p, len(data) - keep)
  return len(data) - keep


def append_samples(path: str | os.PathLike, records: Iterable[Mapping]) -> None:
  """Append records and flush them to disk (one fsync per call: one call per batch)."""
  with open(path, "a", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def done_problems(records: Iterable[Mapping], num_samples: int) -> set[tuple[str, str]]:
  """(benchmark, id) of the problems that already have all sample indices 0..n-1."""
  seen: dict[tuple[str, str], set[int]] = {}
  for r in records:
    seen.setdefault((r["benchmark"], r["id"]), set()).add(int(r["sample"]))
  full = set(range(num_samples))
  return {k for k, v in seen.items() if full <= v}
