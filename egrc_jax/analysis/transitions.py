"""Correctness transitions between an original and a compressed model [paper, Fig. 4].

A problem counts as solved by a model when its mean accuracy over that model's samples is at
least `threshold` (0.5: majority of the samples; ties count as solved). Groups:
  preserved: solved by both      lost:   original only
  gained:    compressed only     failed: neither
Per problem and model: mean generated tokens and mean reasoning steps over its samples
(`common.reasoning_steps`). Only problems present in both evaluations are compared.
"""

from __future__ import annotations

import numpy as np

from egrc_jax.analysis import common
from egrc_jax.evaluate.scoring import group_by_problem

GROUPS = ("preserved", "lost", "gained", "failed")


def transition_group(orig_solved: bool, comp_solved: bool) -> str:
  if orig_solved:
    return "preserved" if comp_solved else "lost"
  return "gained" if comp_solved else "failed"


def per_problem(records: list[dict]) -> dict[str, dict]:
  """{id: {accuracy, tokens, steps}} means over each problem's samples."""
  out = {}
  for pid, rs in group_by_problem(records).items():
    out[pid] = {
      "accuracy": float(np.mean([r["correct"] for r in rs])),
      "tokens": float(np.mean([r["num_tokens"] for r in rs])),
      "steps": float(np.mean([common.reasoning_steps(r["text"]) for r in rs])),
    }
  return out


def transitions(original: list[dict], compressed: list[dict], threshold: float = 0.5):
  """(rows, summary): one row per shared problem, and counts/medians per group."""
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold={threshold} must be in (0, 1]")
  a, b = per_problem(original), per_problem(compressed)
  shared = [pid for pid in a if pid in b]
  if not shared:
    raise ValueError("the two evaluations share no problem ids; evaluate the same benchmark")
  rows = []
  for pid in shared:
    group = transition_group(a[pid]["accuracy"] >= threshold, b[pid]["accuracy"] >= threshold)
    rows.append({
      "id": pid, "group": group,
      "orig_accuracy": a[pid]["accuracy"], "comp_accuracy": b[pid]["accuracy"],
      "orig_tokens": a[pid]["tokens"], "comp_tokens": b[pid]["tokens"],
      "orig_steps": a[pid]["steps"], "comp_steps": b[pid]["steps"],
    })  # fmt: skip
  summary = {"threshold": threshold, "num_problems": len(rows), "groups": {}}
  for g in GROUPS:
    mine = [r for r in rows if r["group"] == g]
    med = lambda k, mine=mine: float(np.median([r[k] for r in mine])) if mine else None
    summary["groups"][g] = {
      "count": len(mine),
      "share": len(mine) / len(rows),
      **{f"median_{k}": med(k) for k in ("orig_tokens", "comp_tokens", "orig_steps", "comp_steps")},
    }
  return rows, summary


def plot(rows: list[dict], summary: dict, path, title: str) -> None:
  """Counts per group, then token and step box plots (original vs compressed per group)."""
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  counts = [summary["groups"][g]["count"] for g in GROUPS]
  axes[0].bar(GROUPS, counts, color=["tab:green", "tab:red", "tab:blue", "tab:gray"])
  axes[0].set_title("problems per transition")
  for ax, key, label in ((axes[1], "tokens", "generated tokens"), (axes[2], "steps", "steps")):
    data, pos, colors = [], [], []
    for i, g in enumerate(GROUPS):
      for j, side in enumerate(("orig", "comp")):
        vals = [r[f"{side}_{key}"] for r in rows if r["group"] == g]
        data.append(vals if vals else [np.nan])
        pos.append(3 * i + j)
        colors.append("tab:orange" if side == "orig" else "tab:purple")
    bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=False)
    for patch, c in zip(bp["boxes"], colors, strict=True):
      patch.set_facecolor(c)
    ax.set_xticks([3 * i + 0.5 for i in range(len(GROUPS))], GROUPS)
    ax.set_title(f"{label} per problem (orange: original, purple: compressed)")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(original: str, compressed: str, benchmark: str, out: str, threshold: float = 0.5):
  """Write transitions.png, transitions.csv and transitions.json to `out`; returns summary."""
  rows, summary = transitions(
    common.load_samples(original, benchmark), common.load_samples(compressed, benchmark), threshold
  )
  d = common.out_dir(out)
  summary["benchmark"] = benchmark
  common.write_csv(d / "transitions.csv", rows)
  common.write_json(d / "transitions.json", summary)
  plot(rows, summary, d / "transitions.png", f"{benchmark}: original -> compressed")
  return summary
