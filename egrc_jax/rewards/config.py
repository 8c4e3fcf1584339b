"""Reward settings and the one entry point the trainer calls: `compute_rewards`.

Inputs and outputs are [P, G] (P prompts x G samples per prompt, one group per row).

Shape letters:
  P  prompts in the batch
  G  samples (responses) per prompt: one group per row
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from egrc_jax.rewards import baselines, shaping

REWARD_NAMES = (
  "egrc_compress",
  "egrc_enhance",
  "ee",
  "linear_compress",
  "accuracy",
  "thinkprune",
  "l1_exact",
  "l1_max",
  "kimi",
  "arora_zanette",
  "shorter_better",
  "dapo_overlong",
)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Which reward, with its coefficients. Paper symbols in brackets; see docs/rewards.md.

  Arms: egrc_compress (stage 1, R = c f), egrc_enhance (stage 2, R_acc = c and R_len = c f;
  total c + w_len c f), ee (entangled, R = c + w_len c f), linear_compress (stage 1 with the
  linear f), accuracy (R = c), and the baselines in `baselines.py`.
  """

  name: str  # one of REWARD_NAMES
  max_len: int  # [L] length limit = the rollout's max_new_tokens
  r: float = 0.5  # [r] f(L) = r, 0 < r < 1 [ours: 0.5]
  shaping: str = "exp"  # f for egrc_compress/egrc_enhance/ee: "exp" [paper] | "linear"
  w_len: float = 0.5  # [w, w_len] weight of c f in the egrc_enhance / ee total [ours]
  clip_truncated: bool = True  # truncated -> c = 0 before any reward (length clipping) [paper]
  l1_alpha: float = 0.0003  # [alpha] L1-Exact / L1-Max length coefficient
  n_target: int = 0  # [n_gold] L1 target length in tokens; required (> 0) by l1_exact, l1_max
  kimi_weight: float = 1.0  # scale of Kimi k1.5's lambda term
  az_alpha: float = 0.1  # [alpha] Arora & Zanette penalty strength, 0 <= alpha < 1
  sb_correct_weight: float = 2.0  # ShorterBetter weight of c
  sb_beta: float = 0.001  # ShorterBetter weight of ||y| - SOL|
  buffer: int = 0  # [L_cache] DAPO overlong buffer in tokens; required (0 < B <= L) by dapo
  dapo_scale: float = 1.0  # DAPO penalty scale (penalty reaches -dapo_scale at L)
  dapo_signed: bool = True  # DAPO's rule reward +1 / -1 (True, as DAPO) or c in {0, 1}

  def __post_init__(self):
    if self.name not in REWARD_NAMES:
      raise ValueError(f"unknown reward name {self.name!r}; valid names: {', '.join(REWARD_NAMES)}")
    shaping.check_shaping_args(self.r, self.max_len)
    if self.shaping not in ("exp", "linear"):
      raise ValueError(f"shaping must be 'exp' or 'linear', got {self.shaping!r}")
    for field in ("w_len", "l1_alpha", "kimi_weight", "sb_correct_weight", "sb_beta", "dapo_scale"):
      value = getattr(self, field)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
    if not 0.0 <= self.az_alpha < 1.0:
      raise ValueError(f"az_alpha must lie in [0, 1) so rewards stay positive, got {self.az_alpha}")
    if self.name in ("l1_exact", "l1_max") and self.n_target <= 0:
      raise ValueError(
        f"reward {self.name!r} needs n_target > 0 (the target length in tokens), "
        f"got n_target={self.n_target}"
      )
    if self.name == "dapo_overlong" and not 0 < self.buffer <= self.max_len:
      raise ValueError(
        f"reward 'dapo_overlong' needs 0 < buffer <= max_len={self.max_len}, "
        f"got buffer={self.buffer} (DAPO used 4096 of 20480)"
      )


@dataclasses.dataclass(frozen=True)
class Rewards:
  """Rewards of one batch, all float32 [P, G].

  total_PG: the scalar reward the arm optimises (used by non-decomposed advantages).
  acc_PG: R_acc = c after length clipping (same for every arm).
  len_PG: R_len = c f(|y|) with the config's r, L and shaping (every arm, so runs log the
    same length signal; stage 2's decomposed advantages use acc_PG and len_PG).
  extra: arm-specific terms (e.g. "l1_penalty", "kimi_lambda", "dapo_penalty", "sol").
  """

  total_PG: np.ndarray
  acc_PG: np.ndarray
  len_PG: np.ndarray
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def metrics(self, prefix: str = "reward/") -> dict[str, float]:
    """Batch means of every component, for logging."""
    out = {
      f"{prefix}total": self.total_PG,
      f"{prefix}acc": self.acc_PG,
      f"{prefix}len": self.len_PG,
    }
    out.update({f"{prefix}{k}": v for k, v in self.extra.items()})
    return {k: float(np.mean(v)) for k, v in out.items()}


def _check_inputs(correct_PG, lengths_PG, truncated_PG):
  shapes = {np.shape(correct_PG), np.shape(lengths_PG), np.shape(truncated_PG)}
  if len(shapes) != 1 or len(np.shape(correct_PG)) != 2:
    raise ValueError(
      "correct, lengths and truncated must share one [P, G] shape, got "
      f"{np.shape(correct_PG)}, {np.shape(lengths_PG)}, {np.shape(truncated_PG)}"
    )
  if np.any(np.asarray(lengths_PG) < 0):
    raise ValueError(f"lengths must be >= 0, got min {np.min(lengths_PG)}")


def compute_rewards(cfg: RewardConfig, correct_PG, lengths_PG, truncated_PG) -> Rewards:
  """Rewards for one batch of groups: bool [P, G], int [P, G], bool [P, G] -> `Rewards`."""
  _check_inputs(correct_PG, lengths_PG, truncated_PG)
  c_raw_PG = shaping.correctness(correct_PG)
  # ThinkPrune is defined by clipping at L, so it clips whatever clip_truncated says.
  clip = cfg.clip_truncated or cfg.name == "thinkprune"
  c_PG = shaping.clip_truncated(c_raw_PG, truncated_PG) if clip else c_raw_PG
  len_PG = np.asarray(lengths_PG, dtype=np.float64)
  f_kind = "linear" if cfg.name == "linear_compress" else cfg.shaping
  f_PG = shaping.shaped(len_PG, cfg.r, cfg.max_len, f_kind)
  rlen_PG = c_PG * f_PG
  extra: dict[str, np.ndarray] = {}
  name = cfg.name
  if name in ("egrc_compress", "linear_compress"):
    total_PG = rlen_PG
  elif name in ("egrc_enhance", "ee"):
    total_PG = c_PG + cfg.w_len * rlen_PG
  elif name in ("accuracy", "thinkprune"):
    total_PG = baselines.thinkprune(c_PG)
  elif name == "l1_exact":
    total_PG = baselines.l1_exact(c_PG, len_PG, cfg.n_target, cfg.l1_alpha)
    extra["l1_penalty"] = total_PG - c_PG
  elif name == "l1_max":
    total_PG = baselines.l1_max(c_PG, len_PG, cfg.n_target, cfg.l1_alpha)
  elif name == "kimi":
    total_PG = baselines.kimi(c_PG, len_PG, cfg.kimi_weight)
    extra["kimi_lambda"] = baselines.kimi_lambda(len_PG)
  elif name == "arora_zanette":
    total_PG = baselines.arora_zanette(c_PG, len_PG, cfg.az_alpha)
  elif name == "shorter_better":
    total_PG = baselines.shorter_better(c_PG, len_PG, cfg.sb_correct_weight, cfg.sb_beta)
    extra["sol"] = np.broadcast_to(baselines.shortest_correct_length(c_PG, len_PG), len_PG.shape)
  elif name == "dapo_overlong":
    pen_PG = baselines.dapo_overlong_penalty(len_PG, cfg.max_len, cfg.buffer)
    total_PG = baselines.dapo_overlong(
      c_PG, len_PG, cfg.max_len, cfg.buffer, cfg.dapo_scale, cfg.dapo_signed
    )
    extra["dapo_penalty"] = pen_PG
  else:  # unreachable: __post_init__ checked the name
    raise ValueError(f"unknown reward name {name!r}; valid names: {', '.join(REWARD_NAMES)}")
  as32 = lambda x: np.asarray(x, dtype=np.float32)
  return Rewards(
    total_PG=as32(total_PG),
    acc_PG=as32(c_PG),
    len_PG=as32(rlen_PG),
    extra={k: as32(v) for k, v in extra.items()},
  )
