"""Length-aware rewards from the literature, the comparison arms of EGRC's experiments.

Pure numpy over [P, G] arrays (P prompts x G samples; a group is a row, group statistics are
over the last axis). `c_PG` is the correctness reward in {0, 1} after length clipping (a
truncated response counts as wrong, see `shaping.clip_truncated`); `len_PG` is |y| in tokens.

Shape letters:
  P  prompts in the batch
  G  samples (responses) per prompt: one group per row
"""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def thinkprune(c_PG) -> np.ndarray:
  """ThinkPrune (Hou et al. 2025): R = c; the length limit L acts only through clipping.

  The caller passes c after `clip_truncated`, so a response cut at L gets 0.
  """
  return _f64(c_PG)


def l1_exact(c_PG, len_PG, n_target: float, alpha: float = 0.0003) -> np.ndarray:
  """L1-Exact (Aggarwal & Welleck 2025): R = c - alpha * | n_target - |y| |."""
  return _f64(c_PG) - alpha * np.abs(n_target - _f64(len_PG))


def l1_max(c_PG, len_PG, n_target: float, alpha: float = 0.0003) -> np.ndarray:
  """L1-Max: R = c * clip(alpha * (n_target - |y|) + 0.5, 0, 1)."""
  return _f64(c_PG) * np.clip(alpha * (n_target - _f64(len_PG)) + 0.5, 0.0, 1.0)


def kimi_lambda(len_PG) -> np.ndarray:
  """Kimi k1.5 length score: lambda = 0.5 - (|y| - min_G) / (max_G - min_G), in [-0.5, 0.5].

  min_G / max_G over all G responses of the group (correct or not). A group whose lengths
  are all equal gets lambda = 0 (no length signal rather than a division by zero).
  """
  len_PG = _f64(len_PG)
  lo_P1 = len_PG.min(axis=-1, keepdims=True)
  span_P1 = len_PG.max(axis=-1, keepdims=True) - lo_P1
  safe_P1 = np.where(span_P1 > 0, span_P1, 1.0)
  return np.where(span_P1 > 0, 0.5 - (len_PG - lo_P1) / safe_P1, 0.0)


def kimi(c_PG, len_PG, weight: float = 1.0) -> np.ndarray:
  """Kimi k1.5 group length penalty: R = c + weight * (lambda if c = 1 else min(0, lambda))."""
  c_PG = _f64(c_PG)
  lam_PG = kimi_lambda(len_PG)
  return c_PG + weight * np.where(c_PG > 0, lam_PG, np.minimum(0.0, lam_PG))


def correct_length_z(c_PG, len_PG) -> np.ndarray:
  """z = (|y| - mean_C) / std_C over the correct responses C of each group (population std).

  z = 0 where the group's correct lengths are all equal (max_C == min_C, tested on the
  lengths themselves, not on a rounded std), which covers fewer than two correct responses;
  z of a wrong response is computed but unused.
  """
  ok_PG = _f64(c_PG) > 0
  len_PG = _f64(len_PG)
  n_P1 = ok_PG.sum(axis=-1, keepdims=True)
  safe_n_P1 = np.maximum(n_P1, 1)
  mean_P1 = np.where(ok_PG, len_PG, 0.0).sum(axis=-1, keepdims=True) / safe_n_P1
  var_P1 = np.where(ok_PG, (len_PG - mean_P1) ** 2, 0.0).sum(axis=-1, keepdims=True) / safe_n_P1
  std_P1 = np.sqrt(var_P1)
  hi_P1 = np.where(ok_PG, len_PG, -np.inf).max(axis=-1, keepdims=True)
  lo_P1 = np.where(ok_PG, len_PG, np.inf).min(axis=-1, keepdims=True)
  spread_P1 = (hi_P1 > lo_P1) & (std_P1 > 0)
  return np.where(spread_P1, (len_PG - mean_P1) / np.where(spread_P1, std_P1, 1.0), 0.0)


def arora_zanette(c_PG, len_PG, alpha: float = 0.1) -> np.ndarray:
  """Arora & Zanette (2025): R = c * (1 - alpha * sigmoid(z)), z from `correct_length_z`.

  With fewer than two correct responses (or equal correct lengths) z = 0, so a correct
  response gets 1 - alpha / 2.
  """
  z_PG = correct_length_z(c_PG, len_PG)
  return _f64(c_PG) * (1.0 - alpha / (1.0 + np.exp(-z_PG)))


def shortest_correct_length(c_PG, len_PG) -> np.ndarray:
  """SOL per group [P, 1]: the shortest correct length; the mean length when none is correct.

  The fallback follows ShorterBetter (Yi et al. 2025): with no correct sample the reward
  pulls lengths toward the group's average.
  """
  ok_PG = _f64(c_PG) > 0
  len_PG = _f64(len_PG)
  shortest_P1 = np.where(ok_PG, len_PG, np.inf).min(axis=-1, keepdims=True)
  return np.where(ok_PG.any(axis=-1, keepdims=True), shortest_P1, len_PG.mean(-1, keepdims=True))


def shorter_better(c_PG, len_PG, correct_weight: float = 2.0, beta: float = 0.001) -> np.ndarray:
  """ShorterBetter: R = correct_weight * c - beta * | |y| - SOL |  (defaults 2 and 0.001)."""
  sol_P1 = shortest_correct_length(c_PG, len_PG)
  return correct_weight * _f64(c_PG) - beta * np.abs(_f64(len_PG) - sol_P1)


def dapo_overlong_penalty(len_PG, max_len: float, buffer: float) -> np.ndarray:
  """DAPO soft overlong penalty: 0 for |y| <= L - B, (L - B - |y|) / B up to L, -1 beyond L.

  B = buffer in (0, L]. Linear from 0 at L - B to -1 at L.
  """
  if not 0 < buffer <= max_len:
    raise ValueError(f"DAPO buffer must satisfy 0 < buffer <= L={max_len}, got buffer={buffer}")
  len_PG = _f64(len_PG)
  return np.clip((max_len - buffer - len_PG) / buffer, -1.0, 0.0)


def dapo_overlong(
  c_PG, len_PG, max_len: float, buffer: float, scale: float = 1.0, signed: bool = True
):
  """DAPO (Yu et al. 2025): R = R_rule + scale * overlong_penalty(|y|).

  R_rule = +1 if correct, -1 otherwise (DAPO's rule-based reward; signed=True, the default),
  or c in {0, 1} with signed=False. The signed form matters: after group normalisation the
  {0, 1} form gives the overlong penalty twice the relative weight that DAPO gives it.
  """
  rule_PG = 2.0 * _f64(c_PG) - 1.0 if signed else _f64(c_PG)
  return rule_PG + scale * dapo_overlong_penalty(len_PG, max_len, buffer)
