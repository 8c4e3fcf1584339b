"""EGRC's rewards: correctness, length clipping, exponent/linear length shaping, stage mixes.

Pure, vectorised numpy functions. Every array is [P, G] (P prompts x G samples per prompt);
the group of a sample is its row, so group statistics are taken over the last axis.

Shape letters:
  P  prompts in the batch
  G  samples (responses) per prompt: one group per row

Notation (docs/rewards.md, EGRC.md): c in {0, 1} the final answer is correct; |y| the
generated length in tokens; L the length limit (the rollout's max_new_tokens); trunc(y): y
hit L without a final answer; r = f(L) the reward left at the limit.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def check_shaping_args(r: float, max_len: float) -> None:
  """Raises ValueError unless 0 < r < 1 and L = max_len > 0 (shared by both shapings)."""
  if not (0.0 < r < 1.0) or math.isnan(r):
    raise ValueError(
      f"length-shaping r must lie strictly inside (0, 1) (f(L) = r), got r={r!r}; "
      "r=0 makes lambda infinite and r=1 switches compression off"
    )
  if not max_len > 0:
    raise ValueError(
      f"length limit L must be > 0 (set it to the rollout's max_new_tokens), got L={max_len!r}"
    )


def correctness(correct_PG) -> np.ndarray:
  """c = 1 if the graded final answer is correct else 0, as float64 [P, G]."""
  return _f64(np.asarray(correct_PG).astype(bool))


def clip_truncated(reward_PG, truncated_PG) -> np.ndarray:
  """Length clipping: R'(y) = 0 if trunc(y) else R(y).  [P, G] -> [P, G]."""
  return np.where(np.asarray(truncated_PG, dtype=bool), 0.0, _f64(reward_PG))


def exp_shaping(lengths_PG, r: float, max_len: float) -> np.ndarray:
  """Exponent shaping f(x) = exp(-lambda x), lambda = -ln(r) / L, so f(0) = 1, f(L) = r.

  Requires 0 < r < 1 and L > 0 (ValueError otherwise). [P, G] lengths -> [P, G] in (0, 1].
  """
  check_shaping_args(r, max_len)
  lam = -math.log(r) / max_len
  return np.exp(-lam * _f64(lengths_PG))


def linear_shaping(lengths_PG, r: float, max_len: float) -> np.ndarray:
  """Linear shaping (ablation): f(x) = 1 - (1 - r) x / L, so f(0) = 1, f(L) = r.

  Same bounds as `exp_shaping`; lengths are expected in [0, L] (beyond L it keeps falling).
  """
  check_shaping_args(r, max_len)
  frac = _f64(lengths_PG) / max_len
  # Written as (1 - x/L) + r x/L: exact at x = L even for r near 0 (no 1 - (1 - r) rounding).
  return (1.0 - frac) + r * frac


def shaped(lengths_PG, r: float, max_len: float, shaping: str) -> np.ndarray:
  """f(|y|) with the named shaping: "exp" (the paper's) or "linear" (ablation)."""
  if shaping == "exp":
    return exp_shaping(lengths_PG, r, max_len)
  if shaping == "linear":
    return linear_shaping(lengths_PG, r, max_len)
  raise ValueError(f"shaping must be 'exp' or 'linear', got {shaping!r}")


def compress_reward(
  correct_PG, lengths_PG, truncated_PG, r: float, max_len: float, shaping: str = "exp"
) -> np.ndarray:
  """Stage 1 (compression): R(y) = c(y) * f(|y|), and R(y) = 0 when trunc(y).  [P, G]."""
  c_PG = clip_truncated(correctness(correct_PG), truncated_PG)
  return c_PG * shaped(lengths_PG, r, max_len, shaping)


def enhance_components(
  correct_PG, lengths_PG, truncated_PG, r: float, max_len: float, shaping: str = "exp"
) -> tuple[np.ndarray, np.ndarray]:
  """Stage 2 decomposition: (R_acc, R_len) = (c, c * f(|y|)), both 0 when trunc(y).

  Returned separately: the losses module normalises each in its own group statistics
  (A = norm_G(R_acc) + w_len * norm_G(R_len)) or the sum (decompose=False).
  """
  c_PG = clip_truncated(correctness(correct_PG), truncated_PG)
  return c_PG, c_PG * shaped(lengths_PG, r, max_len, shaping)


def ee_reward(
  correct_PG, lengths_PG, truncated_PG, r: float, max_len: float, w: float, shaping: str = "exp"
) -> np.ndarray:
  """Entropy-entangled arm: R = c + w * c * f(|y|), and 0 when trunc(y).  [P, G]."""
  acc_PG, len_PG = enhance_components(correct_PG, lengths_PG, truncated_PG, r, max_len, shaping)
  return acc_PG + w * len_PG
