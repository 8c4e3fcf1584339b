"""A process pool that grades answers with a hard per-answer timeout.

Each worker is its own interpreter, `python -P -m egrc_jax.grading.worker` (never fork: the
parent may hold JAX threads, and math-verify's signal.alarm needs a main thread; never
`multiprocessing` spawn either: it re-imports the caller's `__main__`, which breaks a script
that makes a pool at top level without a main guard). Each is fed one answer at a time over
its stdin and replies on its stdout; its stderr is drained into a short buffer, so a worker
that fails to start is reported with its own last words. The parent waits on every worker's
pipes at once; a worker that overruns `timeout_s` is SIGKILLed and replaced, one that dies is
replaced, and the answer it held is graded wrong with status "timeout" / "crash" and logged.
Messages are length-framed JSON both ways (`frames.py`): the parent never unpickles anything
a worker (which handles hostile text) sends, and refuses oversized replies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import site
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait

from egrc_jax.grading.equivalence import MAX_ANSWER_CHARS, exact_match, normalize
from egrc_jax.grading.extract import extract_answer, to_text
from egrc_jax.grading.frames import MAX_REPLY_BYTES, FrameReader, encode_frame, write_all

logger = logging.getLogger(__name__)

STATUSES = ("ok", "no_answer", "timeout", "crash", "error")
MODES = ("math", "exact")
STDERR_TAIL_BYTES = 4096  # kept per worker for the startup-failure message
# The directory that holds the egrc_jax package this process runs: the workers must import the
# same code, whatever the caller's working directory or PYTHONPATH.
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])


@dataclasses.dataclass(frozen=True)
class GradeResult:
  """One graded answer. status: ok | no_answer | timeout | crash (worker died) | error (raised)."""

  answer: str | None
  correct: bool
  status: str


def worker_command(verify_timeout_s: int, memory_mb: int) -> list[str]:
  """The command line of one grading worker (runnable by hand to debug a failing start)."""
  return [
    sys.executable, "-P", "-m", "egrc_jax.grading.worker", str(verify_timeout_s), str(memory_mb)
  ]  # fmt: skip


def worker_env() -> dict[str, str]:
  """The caller's environment, with this egrc_jax's root first on PYTHONPATH unless it is a
  site directory (an installed package: putting site-packages ahead of the standard library
  would let a backport shadow a stdlib module)."""
  env = dict(os.environ)
  site_dirs = {os.path.realpath(d) for d in (*site.getsitepackages(), site.getusersitepackages())}
  paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  root = os.path.realpath(_PACKAGE_ROOT)
  if root not in site_dirs and (not paths or os.path.realpath(paths[0]) != root):
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *paths])
  return env


@dataclasses.dataclass
class _Worker:
  proc: subprocess.Popen
  deadline: float = 0.0
  ready: bool = False
  task: int | None = None  # index of the answer it is grading
  dead: bool = False  # its stdout reached EOF or sent garbage
  stderr_open: bool = True
  frames: FrameReader = dataclasses.field(default_factory=lambda: FrameReader(MAX_REPLY_BYTES))
  stderr_tail: bytearray = dataclasses.field(default_factory=bytearray)

  def send(self, obj) -> bool:
    """Write one message; False when the worker is gone (broken pipe)."""
    try:
      write_all(self.proc.stdin.fileno(), encode_frame(obj))
      return True
    except (BrokenPipeError, OSError, ValueError):
      return False

  def handles(self) -> list:
    return [self.proc.stdout] + ([self.proc.stderr] if self.stderr_open else [])

  def drain_stderr(self) -> None:
    data = os.read(self.proc.stderr.fileno(), 65536)
    if not data:
      self.stderr_open = False
    self.stderr_tail += data
    del self.stderr_tail[:-STDERR_TAIL_BYTES]

  def read_replies(self) -> list:
    """Messages now readable on stdout; marks the worker dead at EOF or on a bad frame."""
    data = os.read(self.proc.stdout.fileno(), 65536)
    if not data:
      self.dead = True
      return []
    try:
      return self.frames.feed(data)
    except ValueError as e:
      logger.warning("grader worker pid %d sent a bad reply (%s); killing it", self.proc.pid, e)
      self.dead = True
      return []

  def stderr_text(self) -> str:
    """The stderr tail, after reading what a dead worker wrote last (to EOF, at most 2 s)."""
    deadline = time.monotonic() + 2.0
    while self.stderr_open and time.monotonic() < deadline:
      if wait([self.proc.stderr], timeout=0.5):
        self.drain_stderr()
    return self.stderr_tail.decode("utf-8", errors="replace").strip()


class GraderPool:
  """Grades (prediction, gold) pairs in `num_workers` worker processes, `timeout_s` per answer.

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
    self._workers: list[_Worker] = []
    self._startup_failures = 0
    if mode == "math":
      self._workers = [self._spawn() for _ in range(num_workers)]

  # -- lifecycle ---------------------------------------------------------------------------------
  def _spawn(self) -> _Worker:
    proc = subprocess.Popen(
      worker_command(self._verify_timeout_s, self.worker_memory_mb),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      bufsize=0,
      env=worker_env(),
      close_fds=True,
      # Ctrl-C in a terminal reaches the parent only (no traceback from every worker); the
      # workers stop when the pool closes, or at the end of stdin when the parent is gone.
      start_new_session=True,
    )
    return _Worker(proc=proc, deadline=time.monotonic() + self.startup_timeout_s)

  def _stop(self, w: _Worker) -> None:
    if w.proc.poll() is None:
      w.proc.kill()
    try:
      w.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      logger.warning("grader worker pid %d did not exit after SIGKILL", w.proc.pid)
    for f in (w.proc.stdin, w.proc.stdout, w.proc.stderr):
      f.close()

  def _replace(self, w: _Worker) -> _Worker:
    self._stop(w)
    new = self._spawn()
    self._workers[self._workers.index(w)] = new
    return new

  def worker_pids(self) -> list[int]:
    return [w.proc.pid for w in self._workers]

  def close(self) -> None:
    for w in self._workers:
      w.send(None)
    deadline = time.monotonic() + 1.0
    for w in self._workers:
      try:
        w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
      self._stop(w)
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
      elif len(p) > MAX_ANSWER_CHARS:
        results[i] = GradeResult(p, False, "ok")  # is_equivalent refuses it: no IPC
      elif normalize(p) == normalize(g):
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
        if w.ready and w.task is None and w.proc.poll() is not None:
          logger.warning("idle grader worker pid %d died; replacing it", w.proc.pid)
          w = self._replace(w)
        if w.ready and w.task is None and todo:
          i = todo.popleft()
          w.task, w.deadline = i, time.monotonic() + self.timeout_s
          w.dead = not w.send([i, preds[i], golds[i]])
      waiting = [w for w in self._workers if w.task is not None or not w.ready]
      timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
      if any(w.dead for w in waiting):
        timeout = 0.0
      fired = set(wait([h for w in waiting for h in w.handles()], timeout=timeout))
      for w in waiting:
        if w.proc.stderr in fired:
          w.drain_stderr()
        for msg in w.read_replies() if w.proc.stdout in fired else []:
          if msg == "ready" and not w.ready:
            w.ready, self._startup_failures = True, 0
          elif self._is_reply(msg, w):
            i, ok, err = msg
            if err is not None:
              logger.warning("grading answer %d raised %s", i, err)
            results[i] = GradeResult(preds[i], bool(ok), "ok" if err is None else "error")
            w.task = None
          else:
            logger.warning("grader worker pid %d sent %.80r; killing it", w.proc.pid, msg)
            w.dead = True
        if w.dead:
          self._fail(w, results, preds, "crash", todo, crashed)
        elif (w.task is not None or not w.ready) and time.monotonic() >= w.deadline:
          self._fail(w, results, preds, "timeout" if w.ready else "startup", todo, crashed)

  @staticmethod
  def _is_reply(msg, w: _Worker) -> bool:
    """[idx, correct, error] for the answer this worker holds, with the right types."""
    return (
      isinstance(msg, list)
      and len(msg) == 3
      and w.task is not None
      and msg[0] == w.task
      and isinstance(msg[1], bool)
      and (msg[2] is None or isinstance(msg[2], str))
    )

  def _fail(self, w: _Worker, results, preds, status: str, todo, crashed: set[int]) -> None:
    if not w.ready:
      self._startup_failures += 1
      if self._startup_failures >= 3:
        self._raise_startup_failure(w, status)
      self._replace(w)
      return
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

  def _raise_startup_failure(self, w: _Worker, status: str) -> None:
    if w.proc.poll() is None:
      w.proc.kill()  # first, so that its stderr ends and can be read to the end
    tail = w.stderr_text() or "(nothing on stderr)"
    self._stop(w)
    what = (
      f"did not say it was ready within startup_timeout_s={self.startup_timeout_s}s"
      if status == "startup"
      else f"exited with code {w.proc.returncode} before it was ready"
    )
    cmd = " ".join(worker_command(self._verify_timeout_s, self.worker_memory_mb))
    path = worker_env().get("PYTHONPATH")
    cmd = f"PYTHONPATH={path} {cmd}" if path else cmd
    raise RuntimeError(
      f"grader worker pid {w.proc.pid} failed to start, 3 times in a row: it {what}. "
      f"Its stderr ended with:\n{tail}\n"
      f"Run the worker by hand to see more: {cmd}"
    )


def grade_responses(
  responses: Sequence[str | bytes | None],
  golds: Sequence[str],
  pool: GraderPool,
  think_open: bool = False,
) -> list[GradeResult]:
  """Extract each response's final answer (`extract_answer`, with `think_open`: the prompt
  opened a think block) and grade it against its gold."""
  return pool.grade_details([extract_answer(r, think_open) for r in responses], golds)


def exact_match_grade(preds: Sequence[str | None], golds: Sequence[str]) -> list[bool]:
  """Normalised exact match, in-process (integer answers of the toy task)."""
  if len(preds) != len(golds):
    raise ValueError(f"{len(preds)} predictions but {len(golds)} golds; pass one gold each")
  return [exact_match(p, g) for p, g in zip(preds, golds, strict=True)]
