"""Benchmark scores from graded samples: pure functions over host lists (no JAX).

Shape letters: P problems of a benchmark, N samples per problem.

Estimators (stated in docs/evaluate.md):
  a_p      = (1/N_p) sum_n c_pn                          per-problem mean accuracy
  pass@1   = (1/P) sum_p a_p
  SE       = std(a_1..a_P; ddof=1) / sqrt(P)             (None when P < 2)
  mean tokens     = mean over all samples of |y| (generated tokens, stop token included)
  truncation rate = share of samples that hit max_new_tokens without a stop token
  length ratio    = mean tokens / the baseline's mean tokens on the same benchmark
Average over benchmarks: unweighted mean of the per-benchmark values; its SE is
sqrt(sum_b SE_b^2) / K for K benchmarks (independent benchmarks); the average length ratio
is the mean of the per-benchmark ratios.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def pass_at_1(correct_PN: Sequence[Sequence[bool]]) -> tuple[float, float | None]:
  """(pass@1, its standard error) from each problem's sample verdicts (see the module doc)."""
  if not correct_PN or any(len(c) == 0 for c in correct_PN):
    raise ValueError("pass_at_1 needs at least one problem and one sample per problem")
  a_P = np.array([np.mean(np.asarray(c, dtype=np.float64)) for c in correct_PN])
  se = float(np.std(a_P, ddof=1) / math.sqrt(len(a_P))) if len(a_P) > 1 else None
  return float(a_P.mean()), se


def group_by_problem(records: Sequence[Mapping]) -> dict[str, list[Mapping]]:
  """{problem id: its sample records sorted by sample index}, in first-seen order."""
  out: dict[str, list[Mapping]] = {}
  for r in records:
    out.setdefault(r["id"], []).append(r)
  return {k: sorted(v, key=lambda r: r["sample"]) for k, v in out.items()}


def benchmark_summary(records: Sequence[Mapping], baseline: Mapping | None = None) -> dict:
  """Scores of one benchmark's sample records; `baseline` is that benchmark's entry of a
  baseline results.json (its "mean_tokens" and "pass@1" give the ratio and the delta)."""
  groups = group_by_problem(records)
  acc, se = pass_at_1([[bool(r["correct"]) for r in g] for g in groups.values()])
  tokens = np.array([r["num_tokens"] for r in records], np.float64)
  out = {
    "pass@1": acc,
    "stderr": se,
    "num_problems": len(groups),
    "num_samples": len(records),
    "mean_tokens": float(tokens.mean()),
    "truncation_rate": float(np.mean([bool(r["truncated"]) for r in records])),
    "length_ratio": None,
    "baseline_pass@1": None,
    "baseline_mean_tokens": None,
  }
  if baseline:
    out["baseline_pass@1"] = baseline.get("pass@1")
    out["baseline_mean_tokens"] = baseline.get("mean_tokens")
    if baseline.get("mean_tokens"):
      out["length_ratio"] = out["mean_tokens"] / float(baseline["mean_tokens"])
  return out


def average(summaries: Mapping[str, Mapping]) -> dict:
  """Unweighted average over benchmarks (see the module doc); None where any is missing."""
  rows = list(summaries.values())
  if not rows:
    return {}

  def mean(key):
    vals = [r[key] for r in rows]
    return None if any(v is None for v in vals) else float(np.mean(vals))

  ses = [r["stderr"] for r in rows]
  se = None if any(s is None for s in ses) else float(math.sqrt(sum(s * s for s in ses)) / len(ses))
  return {
    "pass@1": mean("pass@1"),
    "stderr": se,
    "num_problems": int(sum(r["num_problems"] for r in rows)),
    "num_samples": int(sum(r["num_samples"] for r in rows)),
    "mean_tokens": mean("mean_tokens"),
    "truncation_rate": mean("truncation_rate"),
    "length_ratio": mean("length_ratio"),
    "baseline_pass@1": mean("baseline_pass@1"),
    "baseline_mean_tokens": mean("baseline_mean_tokens"),
  }


def _pct(x: float | None, se: float | None = None) -> str:
  if x is None:
    return "-"
  return f"{100 * x:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def markdown_table(summaries: Mapping[str, Mapping], avg: Mapping | None = None) -> str:
  """The results table: one row per benchmark, then the average."""
  head = (
    "| benchmark | problems | samples | pass@1 (%) ± SE | mean tokens | truncated (%) "
    "| length ratio | baseline pass@1 (%) |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
  )
  rows = dict(summaries)
  if avg:
    rows["**average**"] = avg
  lines = []
  for name, s in rows.items():
    ratio = "-" if s["length_ratio"] is None else f"{s['length_ratio']:.3f}"
    lines.append(
      f"| {name} | {s['num_problems']} | {s['num_samples']} | {_pct(s['pass@1'], s['stderr'])} "
      f"| {s['mean_tokens']:.1f} | {_pct(s['truncation_rate'])} | {ratio} "
      f"| {_pct(s['baseline_pass@1'])} |"
    )
  return head + "\n".join(lines) + "\n"
