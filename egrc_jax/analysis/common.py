"""Shared helpers of the analysis commands: reading evaluation outputs, writing CSV/JSON, and
a matplotlib figure on the Agg backend (no display needed)."""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

from egrc_jax.evaluate import samples_io
from egrc_jax.grading import split_reasoning


def samples_path(path: str | os.PathLike) -> pathlib.Path:
  """samples.jsonl itself, or the one inside an evaluation workdir."""
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / samples_io.SAMPLES_FILE
  if not p.is_file():
    raise FileNotFoundError(
      f"{p} not found: pass an evaluation --workdir (python -m egrc_jax.evaluate) or its "
      "samples.jsonl"
    )
  return p


def load_samples(path: str | os.PathLike, benchmark: str | None = None) -> list[dict]:
  """The records of an evaluation's samples.jsonl, optionally of one benchmark."""
  records = samples_io.read_samples(samples_path(path))
  if benchmark:
    records = [r for r in records if r["benchmark"] == benchmark]
    if not records:
      raise ValueError(f"{path} has no samples of benchmark {benchmark!r}")
  return records


def eval_settings(path: str | os.PathLike) -> dict:
  """The evaluation's EvalConfig as saved in eval_config.json ({} when absent)."""
  p = samples_path(path).parent / "eval_config.json"
  return json.loads(p.read_text()).get("config", {}) if p.is_file() else {}


def reasoning_steps(text: str) -> int:
  """Reasoning steps of a response: paragraph breaks ("\\n\\n") in its reasoning part (the
  text before the last </think>; the whole text when there is no </think>), plus one for a
  non-empty reasoning part. A heuristic: R1-style models open a new step with a blank line."""
  reasoning, answer = split_reasoning(text)
  if not reasoning and answer is not None:
    reasoning = answer  # no think tags: the whole response is the reasoning
  reasoning = reasoning.strip()
  return reasoning.count("\n\n") + 1 if reasoning else 0


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


def write_json(path: str | os.PathLike, obj) -> None:
  pathlib.Path(path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def pyplot():
  """matplotlib.pyplot on the Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def out_dir(path: str | os.PathLike) -> pathlib.Path:
  p = pathlib.Path(path)
  p.mkdir(parents=True, exist_ok=True)
  return p
