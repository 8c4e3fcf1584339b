"""Samples each objective rewards [paper, Fig. 3a]: length and mean-entropy distributions.

Per problem, its N evaluation samples form a group (shape letters: P problems, G = N).
  compression objective (EGRC stage 1): R = c * f(|y|), f(x) = exp(-lambda x), f(L) = r,
    R = 0 when truncated; it rewards the samples with R > 0, each with weight R (A = beta R);
  accuracy objective: rewards the samples with c = 1, each with weight 1.
With weight="reward" the compression histograms weight each sample by its R (how strongly the
objective pulls towards it); weight="none" counts each selected sample once.
Mean entropy of a sample: the mean untempered token entropy over its response
(samples.jsonl "entropy_mean").
"""

from __future__ import annotations

import numpy as np

from egrc_jax.analysis import common
from egrc_jax.evaluate.scoring import group_by_problem
from egrc_jax.rewards import RewardConfig, compute_rewards

WEIGHTS = ("reward", "none")


def selected_table(records: list[dict], max_len: int, r: float = 0.5) -> list[dict]:
  """One row per sample with its length, mean entropy, c, truncation and stage-1 reward R."""
  rows = []
  for pid, rs in group_by_problem(records).items():
    c = np.array([[x["correct"] for x in rs]], bool)
    n = np.array([[x["num_tokens"] for x in rs]], np.int64)
    t = np.array([[x["truncated"] for x in rs]], bool)
    R = compute_rewards(RewardConfig("egrc_compress", max_len=max_len, r=r), c, n, t).total_PG[0]
    for x, rew in zip(rs, R, strict=True):
      rows.append({
        "benchmark": x["benchmark"], "id": pid, "sample": x["sample"],
        "num_tokens": x["num_tokens"], "entropy_mean": x["entropy_mean"],
        "correct": bool(x["correct"]), "truncated": bool(x["truncated"]), "reward": float(rew),
      })  # fmt: skip
  return rows


def _wmean(x, w) -> float | None:
  return float(np.average(x, weights=w)) if len(x) and np.sum(w) > 0 else None


def summarize(rows: list[dict], weight: str) -> dict:
  comp = [r for r in rows if r["reward"] > 0]
  acc = [r for r in rows if r["correct"]]
  out = {"num_samples": len(rows), "weight": weight}
  for name, sel in (("compression", comp), ("accuracy", acc)):
    w = np.array([r["reward"] if name == "compression" and weight == "reward" else 1.0
                  for r in sel])  # fmt: skip
    out[name] = {
      "count": len(sel),
      "mean_tokens": _wmean([r["num_tokens"] for r in sel], w),
      "mean_entropy": _wmean([r["entropy_mean"] for r in sel], w),
    }
  return out


def plot(rows: list[dict], weight: str, path, title: str) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  comp = [r for r in rows if r["reward"] > 0]
  acc = [r for r in rows if r["correct"]]
  for ax, key, label in ((axes[0], "num_tokens", "response length (tokens)"),
                         (axes[1], "entropy_mean", "mean token entropy")):  # fmt: skip
    vals = [r[key] for r in rows]
    bins = np.linspace(min(vals), max(vals) + 1e-9, 30) if vals else 10
    for sel, name, color in ((acc, "accuracy (c=1)", "tab:blue"),
                             (comp, "compression (R>0)", "tab:orange")):  # fmt: skip
      if not sel:
        continue
      w = [r["reward"] for r in sel] if "compression" in name and weight == "reward" else None
      ax.hist([r[key] for r in sel], bins=bins, weights=w, alpha=0.55, color=color, label=name,
              density=True)  # fmt: skip
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(samples: str, out: str, max_len: int = 0, r: float = 0.5, weight: str = "reward",
        benchmark: str | None = None) -> dict:  # fmt: skip
  """Write selected_samples.{png,csv,json}. max_len (L) defaults to the evaluation's
  max_new_tokens."""
  if weight not in WEIGHTS:
    raise ValueError(f"weight={weight!r}; use one of {WEIGHTS}")
  L = max_len or int(common.eval_settings(samples).get("max_new_tokens", 0))
  if L <= 0:
    raise ValueError("pass --max_len (the length limit L of the stage-1 reward)")
  rows = selected_table(common.load_samples(samples, benchmark), L, r)
  d = common.out_dir(out)
  summary = summarize(rows, weight)
  summary.update(max_len=L, r=r, benchmark=benchmark)
  common.write_csv(d / "selected_samples.csv", rows)
  common.write_json(d / "selected_samples.json", summary)
  plot(rows, weight, d / "selected_samples.png", f"samples each objective rewards (L={L}, r={r})")
  return summary
