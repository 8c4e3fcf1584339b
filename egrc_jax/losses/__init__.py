"""The learner's pure loss functions: advantages, token log-probs and entropy (vocab
chunked), PPO-clip, KL estimators, aggregation, entropy selection, diagnostics, and their
one composition (`loss_weights`, `batch_loss`). See docs/losses.md for every formula."""

from egrc_jax.losses.advantages import (
  absolute_advantages,
  decomposed_advantages,
  entangled_advantages,
  group_relative_advantages,
  groups_from_rows,
  rows_from_groups,
)
from egrc_jax.losses.aggregate import AGG_MODES, aggregate, aggregation_weights, weighted_sum
from egrc_jax.losses.diagnostics import (
  approx_kl,
  clip_fractions,
  connector_entropy,
  connector_mask,
  high_entropy_share,
  logit_grad_norm,
  masked_mean,
  pearson_corr,
)
from egrc_jax.losses.policy_loss import (
  TOKEN_STAT_NAMES,
  LossConfig,
  batch_loss,
  loss_weights,
  token_loss,
)
from egrc_jax.losses.selection import (
  SELECT_MODES,
  high_entropy_mask,
  restrict_to_high_entropy,
  reweight_high_entropy,
  selection_factor,
)
from egrc_jax.losses.surrogate import (
  KL_KINDS,
  ClipIndicators,
  entropy_bonus,
  kl_k1,
  kl_k2,
  kl_k3,
  kl_penalty,
  ppo_clip_objective,
)
from egrc_jax.losses.token_stats import (
  TokenStats,
  logprobs_and_entropy_from_logits,
  token_logprobs_and_entropy,
  token_stats,
  token_stats_from_logits,
)

__all__ = [
  "AGG_MODES",
  "KL_KINDS",
  "SELECT_MODES",
  "TOKEN_STAT_NAMES",
  "ClipIndicators",
  "LossConfig",
  "TokenStats",
  "absolute_advantages",
  "aggregate",
  "aggregation_weights",
  "approx_kl",
  "batch_loss",
  "clip_fractions",
  "connector_entropy",
  "connector_mask",
  "decomposed_advantages",
  "entangled_advantages",
  "entropy_bonus",
  "group_relative_advantages",
  "groups_from_rows",
  "high_entropy_mask",
  "high_entropy_share",
  "kl_k1",
  "kl_k2",
  "kl_k3",
  "kl_penalty",
  "logit_grad_norm",
  "logprobs_and_entropy_from_logits",
  "loss_weights",
  "masked_mean",
  "pearson_corr",
  "ppo_clip_objective",
  "restrict_to_high_entropy",
  "reweight_high_entropy",
  "rows_from_groups",
  "selection_factor",
  "token_logprobs_and_entropy",
  "token_loss",
  "token_stats",
  "token_stats_from_logits",
  "weighted_sum",
]
