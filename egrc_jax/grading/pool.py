"""A spawn-context process pool that grades answers with a hard per-answer timeout.

Each worker is a `spawn` process (never fork: the parent may hold JAX threads, and math-verify's
signal.alarm needs a main thread) fed one answer at a time over its own pipe. The parent waits on
all pipes and process sentinels at once; a worker that overruns `timeout_s` is SIGKILLed and
replaced, one that dies is replaced, and the answer it held is graded wrong with status
"timeout" / "crash" and logged. Messages are JSON bytes both ways: the parent never unpickles
anything a worker (which handles hostile text) sends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from egrc_jax.grading.equivalence import MAX_ANSWER_CHARS, exact_match, is_equivalent, normalize
from egrc_jax.grading.extract import extract_answer, to_text

logger = logging.getLogger(__name__)

STATUSES = ("ok", "no_answer", "timeout", "crash", "error")
MODES = ("math", "exact")


@dataclasses.dataclass(frozen=True)
class GradeResult:
  """One graded answer. status: ok | no_answer | timeout | crash (worker died) | error (raised)."""

  answer: str | None
  correct: bool
  status: str


def _worker_main(conn: Connection, verify_timeout_s: int, memory_mb: int) -> None:
  """Worker loop: JSON [idx, pred, gold] in, JSON [idx, correct, error] out; null stops."""
  import resource

  limit = memory_mb * 2**20
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a runaway sympy raises MemoryError
  is_equivalent("1", "\\frac{2}{2}", verify_timeout_s)  # warm the sympy/ANTLR imports
  conn.send_bytes(b'"ready"')
  while True:
    task = json.loads(conn.recv_bytes())
    if task is None:
      return
    idx, pred, gold = task
    try:
      conn.send_bytes(json.dumps([idx, is_equivalent(pred, gold, verify_timeout_s), None]).encode())
    except Exception as e:  # noqa: BLE001 -- any failure is a wrong answer, never a dead pool
      conn.send_bytes(json.dumps([idx, False, f"{type(e).__name__}: {e}"[:300]]).encode())


@dataclasses.dataclass
class _Worker:
  proc: mp.process.BaseProcess
  conn: Connection
  ready: bool = False
  task: int | None = None  # index of the answer it is grading
  deadline: float = 0.0


class GraderPool:
  """Grades (prediction, gold) pairs in `num_workers` spawn processes, `timeout_s` per answer.

  mode="math": fast normalised-string match in the parent, else math-verify in a worker.
  mode="exact": normalised exact match only (integer answers, the toy task); no processes.
  Use as a context manager; `close()` stops the workers.
  """

  def __init__(
    self,
    num_workers: int = 2,
    timeout_s: float = 5.0,
    mode: str = "math",
    worker_memory_mb: int = 4096,
    startup_timeout_s: float = 120.0,
  ):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if num_workers < 1:
      raise ValueError(f"num_workers={num_workers}; need at least 1 grading process")
    if timeout_s <= 0:
      raise ValueError(f"timeout_s={timeout_s}; give a positive per-answer limit in seconds")
    self.mode, self.num_workers, self.timeout_s = mode, num_workers, timeout_s
    self.worker_memory_mb, self.startup_timeout_s = worker_memory_mb, startup_timeout_s
    # math-verify's own alarms (whole seconds, one per parse/compare) end ordinary slowness with a
    # clean False; the hard kill is for what they cannot interrupt. Some real golds take ~1.1 s
    # to parse (an interval of pi^2 fractions), so these alarms must not be tighter than that.
    self._verify_timeout_s = max(1, round(timeout_s * 0.6))
    self._ctx = mp.get_context("spawn")
    self._workers: list[_Worker] = []
    self._startup_failures = 0
    if mode == "math":
      self._workers = [self._spawn() for _ in range(num_workers)]

  # -- lifecycle ---------------------------------------------------------------------------------
  def _spawn(self) -> _Worker:
    parent, child = self._ctx.Pipe(duplex=True)
    args = (child, self._verify_timeout_s, self.worker_memory_mb)
    proc = self._ctx.Process(target=_worker_main, args=args, daemon=True, name="egrc-grader")
    proc.start()
    child.close()
    return _Worker(proc=proc, conn=parent, deadline=time.monotonic() + self.startup_timeout_s)

  def _replace(self, w: _Worker) -> _Worker:
    if w.proc.is_alive():
      w.proc.kill()
    w.proc.join(timeout=5)
    w.conn.close()
    new = self._spawn()
    self._workers[self._workers.index(w)] = new
    return new

  def worker_pids(self) -> list[int]:
    return [w.proc.pid for w in self._workers]

  def close(self) -> None:
    for w in self._workers:
      try:
        w.conn.send_bytes(b"null")
      except (OSError, ValueError):
        pass
    for w in self._workers:
      w.proc.join(timeout=1)
      if w.proc.is_alive():
        w.proc.kill()
        w.proc.join(timeout=5)
      w.conn.close()
    self._workers = []

  def __enter__(self) -> GraderPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- grading -----------------------------------------------------------------------------------
  def grade(self, preds: Sequence[str | None], golds: Sequence[str]) -> list[bool]:
    """Correct or not, per pair; None predictions are wrong."""
    return [r.correct for r in self.grade_details(preds, golds)]

  def grade_details(self, preds: Sequence[str | None], golds: Sequence[str]) -> list[GradeResult]:
    """One GradeResult per pair, in order."""
    if len(preds) != len(golds):
      raise ValueError(f"{len(preds)} predictions but {len(golds)} golds; pass one gold each")
    results: list[GradeResult | None] = [None] * len(preds)
    todo: deque[int] = deque()
    clean = [None if p is None else to_text(p) for p in preds]
    for i, (p, g) in enumerate(zip(clean, golds, strict=True)):
      if p is None or not p.strip():
        results[i] = GradeResult(p, False, "no_answer")
      elif self.mode == "exact":
        results[i] = GradeResult(p, exact_match(p, g), "ok")
      elif len(p) <= MAX_ANSWER_CHARS and normalize(p) == normalize(g):
        results[i] = GradeResult(p, True, "ok")  # fast path: no IPC, no sympy
      else:
        todo.append(i)
    if todo:
      self._run(todo, clean, golds, results)
    return results  # type: ignore[return-value]

  def _run(self, todo, preds, golds, results) -> None:
    crashed: set[int] = set()
    while todo or any(w.task is not None for w in self._workers):
      for w in list(self._workers):
        if w.task is None and w.ready and not w.proc.is_alive():
          logger.warning("idle grader worker pid %d died; replacing it", w.proc.pid)
          w = self._replace(w)
        if w.ready and w.task is None and todo:
          i = todo.popleft()
          w.conn.send_bytes(json.dumps([i, preds[i], golds[i]]).encode())
          w.task, w.deadline = i, time.monotonic() + self.timeout_s
      waiting = [w for w in self._workers if w.task is not None or not w.ready]
      timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
      handles = [h for w in waiting for h in (w.conn, w.proc.sentinel)]
      fired = set(wait(handles, timeout=timeout))
      for w in list(waiting):
        if w.conn in fired:
          try:
            msg = json.loads(w.conn.recv_bytes())
          except (EOFError, OSError):
            msg = None  # died mid-reply: the sentinel branch below handles it
          if msg == "ready":
            w.ready, self._startup_failures = True, 0
            continue
          if isinstance(msg, list):
            i, ok, err = msg
            if i == w.task:
              if err is not None:
                logger.warning("grading answer %d raised %s", i, err)
              results[i] = GradeResult(preds[i], bool(ok), "ok" if err is None else "error")
              w.task = None
              continue
        if w.proc.sentinel in fired or not w.proc.is_alive():
          self._fail(w, results, preds, "crash", todo, crashed)
        elif time.monotonic() >= w.deadline:
          self._fail(w, results, preds, "timeout" if w.ready else "startup", todo, crashed)

  def _fail(self, w: _Worker, results, preds, status: str, todo, crashed: set[int]) -> None:
    if not w.ready:
      self._startup_failures += 1
      self._replace(w)
      if self._startup_failures < 3:
        return
      raise RuntimeError(
        f"grader worker pid {w.proc.pid} failed to start ({status}, exit code "
        f"{w.proc.exitcode}); check that `python -c 'import math_verify'` works"
      )
    if w.task is not None and status == "crash" and w.task not in crashed:
      # A worker can die for reasons of its own (killed from outside, memory pressure): give the
      # answer one more try on a fresh worker; a second crash on it counts it wrong.
      crashed.add(w.task)
      todo.appendleft(w.task)
      logger.warning("grader worker pid %d died; retrying answer %d once", w.proc.pid, w.task)
    elif w.task is not None:
      i = w.task
      what = f"overran {self.timeout_s}s" if status == "timeout" else "died"
      logger.warning(
        "grading answer %d: worker pid %d %s; counted wrong: %.80r", i, w.proc.pid, what, preds[i]
      )
      results[i] = GradeResult(preds[i], False, status)
    self._replace(w)


def grade_responses(
  responses: Sequence[str | bytes | None], golds: Sequence[str], pool: GraderPool
) -> list[GradeResult]:
  """Extract each response's final answer (`extract_answer`) and grade it against its gold."""
  return pool.grade_details([extract_answer(r) for r in responses], golds)


def exact_match_grade(preds: Sequence[str | None], golds: Sequence[str]) -> list[bool]:
  """Normalised exact match, in-process (integer answers of the toy task)."""
  if len(preds) != len(golds):
    raise ValueError(f"{len(preds)} predictions but {len(golds)} golds; pass one gold each")
  return [exact_match(p, g) for p, g in zip(preds, golds, strict=True)]
