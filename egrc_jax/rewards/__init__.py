"""Rewards: correctness, length clipping, length shaping, and the literature's baselines.

All functions take [P, G] arrays (P prompts x G samples per prompt; a group is a row).
The trainer calls `compute_rewards(RewardConfig(...), correct_PG, lengths_PG, truncated_PG)`.
"""

from egrc_jax.rewards.baselines import (
  arora_zanette,
  correct_length_z,
  dapo_overlong,
  dapo_overlong_penalty,
  kimi,
  kimi_lambda,
  l1_exact,
  l1_max,
  shorter_better,
  shortest_correct_length,
  thinkprune,
)
from egrc_jax.rewards.config import REWARD_NAMES, RewardConfig, Rewards, compute_rewards
from egrc_jax.rewards.shaping import (
  clip_truncated,
  compress_reward,
  correctness,
  ee_reward,
  enhance_components,
  exp_shaping,
  linear_shaping,
  shaped,
)

__all__ = [
  "REWARD_NAMES",
  "RewardConfig",
  "Rewards",
  "arora_zanette",
  "clip_truncated",
  "compress_reward",
  "compute_rewards",
  "correct_length_z",
  "correctness",
  "dapo_overlong",
  "dapo_overlong_penalty",
  "ee_reward",
  "enhance_components",
  "exp_shaping",
  "kimi",
  "kimi_lambda",
  "l1_exact",
  "l1_max",
  "linear_shaping",
  "shaped",
  "shorter_better",
  "shortest_correct_length",
  "thinkprune",
]
