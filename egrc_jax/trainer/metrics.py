"""Metrics sinks: JSONL file, TensorBoard, and a one-line console progress report.

Only process 0 writes (multi-host runs reduce metrics to global values before this).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

_CONSOLE_KEYS = (
  ("stage", "{}"),
  ("reward/total", "R={:.3f}"),
  ("accuracy", "acc={:.3f}"),
  ("length/mean", "len={:.1f}"),
  ("entropy/mean", "H={:.3f}"),
  ("loss", "loss={:.4f}"),
  ("grad_norm", "|g|={:.3f}"),
  ("time/step", "{:.2f}s/step"),
)


RUN_FINISHED = "run finished"


def stage_begins(stage_name: str) -> str:
  """The event text that marks the start of a stage (readers use `is_stage_begin`)."""
  return f"stage {stage_name} begins"


def is_stage_begin(message) -> bool:
  text = str(message)
  return text.startswith("stage ") and text.endswith(" begins")


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.total = max(total_steps, 1)
    self.t0 = time.time()
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
    self._console(step, clean)

  def _console(self, step: int, m: dict) -> None:
    evals = {k: v for k, v in m.items() if k.startswith("eval/")}
    if evals and "loss" not in m:  # an evaluation row: its numbers, not a progress bar
      parts = " ".join(f"{k.removeprefix('eval/')}={_fmt('{:.3f}', v)}" for k, v in evals.items())
      print(f"== step {step}: evaluation {parts}", flush=True, file=sys.stdout)
      return
    done = min(step / self.total, 1.0)
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    parts = [_fmt(fmt, m[k]) for k, fmt in _CONSOLE_KEYS if k in m and m[k] is not None]
    eta = (time.time() - self.t0) / max(done, 1e-9) * (1 - done) if done > 0 else 0
    print(
      f"[{bar}] {step}/{self.total} " + " ".join(parts) + f" eta {eta:.0f}s",
      flush=True,
      file=sys.stdout,
    )

  def event(self, step: int, message: str, **fields) -> None:
    """A non-metric event (stage switch, skipped update, checkpoint) in the log and console."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "event": message, **fields}) + "\n")
    self._jsonl.flush()
    print(f"== step {step}: {message} {fields if fields else ''}", flush=True)

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _fmt(fmt: str, v) -> str:
  """Numbers by their format; non-finite values (stored as strings) as they are."""
  if isinstance(v, str) and "{}" not in fmt:
    return fmt.split("=")[0] + "=" + v if "=" in fmt else v
  return fmt.format(v)


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v
