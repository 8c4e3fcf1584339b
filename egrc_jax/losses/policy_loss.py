"""The learner's loss: LossConfig, the per-token loss, and the composed `policy_loss`.

Shape letters: B rows (P prompts x G samples, prompt-major), T completion length.

    l_bt = s_bt * ppo_bt + kl_coef * kl_bt - entropy_coef * H_bt         (`token_loss`)
    L    = sum_{b,t} w_bt l_bt                                           (`policy_loss`)

ppo: `ppo_clip_objective`; kl: `kl_penalty(kl_kind)`; s: entropy selection factor
(`selection.py`); w: aggregation weights (`aggregate.py`), zero on padding and on rows
outside sample_mask_B (stage 1 positive-only), so those rows get exactly zero gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from egrc_jax.losses import diagnostics as diag
from egrc_jax.losses.aggregate import AGG_MODES, aggregation_weights, weighted_sum
from egrc_jax.losses.selection import SELECT_MODES, high_entropy_mask, selection_factor
from egrc_jax.losses.surrogate import KL_KINDS, kl_k3, kl_penalty, ppo_clip_objective

# Per-token statistics returned by `token_loss` (means are taken with the aggregation weights).
TOKEN_STAT_NAMES = (
  "pg_loss",
  "kl",
  "entropy",
  "ratio",
  "clip_frac_low",
  "clip_frac_high",
  "clip_frac_dual",
  "clip_frac",
  "approx_kl",
)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Settings of the policy loss (hashable: usable as a static jit argument).

  Paper symbols: eps_low / eps_high are PPO's epsilon (clip-higher when they differ), c the
  dual-clip constant, beta_KL = kl_coef, rho the high-entropy quantile. Defaults are [ours]
  (EGRC.md): PPO eps 0.2, KL off, no entropy bonus, token-mean, no selection.
  """

  eps_low: float = 0.2  # lower clip: ratio floor 1 - eps_low (negative advantages)
  eps_high: float = 0.2  # upper clip: ratio cap 1 + eps_high (positive advantages)
  dual_clip_c: float | None = None  # dual-clip bound c > 1 on negative advantages; None = off
  kl_kind: str | None = None  # None (off) | "k1" | "k2" | "k3": per-token KL to the reference
  kl_coef: float = 0.0  # weight of the KL term (needs kl_kind)
  entropy_coef: float = 0.0  # entropy bonus weight (subtracted from the loss)
  agg_mode: str = "token-mean"  # one of aggregate.AGG_MODES
  max_len_norm: int | None = None  # the constant length of "seq-mean-token-sum-norm"
  exclude_masked_from_denominator: bool = True  # excluded rows' tokens leave the denominators
  entropy_select: str = "off"  # "off" | "restrict" | "reweight": high-entropy token selection
  rho: float = 0.2  # top-rho entropy quantile (selection and diagnostics)
  high_entropy_weight: float = 2.0  # "reweight": factor on high-entropy tokens' PPO term
  vocab_chunk: int = 8192  # vocab columns per chunk in `token_logprobs_and_entropy`

  def __post_init__(self):
    if not 0.0 <= self.eps_low < 1.0:
      raise ValueError(f"eps_low={self.eps_low} must be in [0, 1) (ratio floor 1 - eps_low > 0)")
    if self.eps_high < 0.0:
      raise ValueError(f"eps_high={self.eps_high} must be >= 0")
    if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
      raise ValueError(f"dual_clip_c={self.dual_clip_c} must be > 1; use None to turn it off")
    if self.kl_kind is not None and self.kl_kind not in KL_KINDS:
      raise ValueError(f"kl_kind={self.kl_kind!r}: use None (off) or one of {KL_KINDS}")
    if self.kl_coef < 0.0:
      raise ValueError(f"kl_coef={self.kl_coef} must be >= 0")
    if self.kl_coef > 0.0 and self.kl_kind is None:
      raise ValueError(f"kl_coef={self.kl_coef} > 0 but kl_kind is None; set kl_kind='k3' etc.")
    if self.agg_mode not in AGG_MODES:
      raise ValueError(f"agg_mode={self.agg_mode!r}: use one of {AGG_MODES}")
    if self.agg_mode == "seq-mean-token-sum-norm" and (
      self.max_len_norm is None or self.max_len_norm < 1
    ):
      raise ValueError(
        f"agg_mode='seq-mean-token-sum-norm' needs max_len_norm >= 1 (got {self.max_len_norm});"
        " set it to the rollout's max_new_tokens"
      )
    if self.entropy_select not in SELECT_MODES:
      raise ValueError(f"entropy_select={self.entropy_select!r}: use one of {SELECT_MODES}")
    if not 0.0 < self.rho <= 1.0:
      raise ValueError(f"rho={self.rho} must be in (0, 1] (the high-entropy token fraction)")
    if self.high_entropy_weight <= 0.0:
      raise ValueError(f"high_entropy_weight={self.high_entropy_weight} must be > 0")
    if self.vocab_chunk < 1:
      raise ValueError(f"vocab_chunk={self.vocab_chunk} must be >= 1")


def _broadcast_adv(advantages: jax.Array, shape: tuple[int, int]) -> jax.Array:
  if advantages.shape == shape:
    return advantages.astype(jnp.float32)
  if advantages.shape == shape[:1]:
    return jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], shape)
  raise ValueError(f"advantages have shape {advantages.shape}; expected [B]={shape[:1]} or {shape}")


def token_loss(
  logp_BT: jax.Array,
  entropy_BT: jax.Array,
  old_logp_BT: jax.Array,
  ref_logp_BT: jax.Array | None,
  advantages: jax.Array,
  cfg: LossConfig,
  select_BT: jax.Array | None = None,
  valid_BT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token loss l_bt (module docstring) and per-token statistics (TOKEN_STAT_NAMES).

  advantages: [B] (broadcast over tokens) or [B, T]. select_BT: the entropy selection factor
  s (None = 1), computed for the whole batch beforehand when micro-batching.
  valid_BT: the tokens whose loss counts (weight != 0); elsewhere the behaviour and
  reference logprobs are replaced by the policy's own (ratio 1, KL 0) and the loss is 0. A
  masked-out slot can hold anything (k3's exp(ref - logp) overflows on a pad slot whose ref
  is 0 and logp -100): multiplying by a zero weight does not help, because 0 * inf is NaN in
  the loss and in its gradient.
  """
  if valid_BT is not None:
    valid_BT = valid_BT.astype(bool)
    own = jax.lax.stop_gradient(logp_BT)
    old_logp_BT = jnp.where(valid_BT, old_logp_BT, own)
    if ref_logp_BT is not None:
      ref_logp_BT = jnp.where(valid_BT, ref_logp_BT, own)
  adv_BT = _broadcast_adv(advantages, logp_BT.shape)
  pg_BT, clip = ppo_clip_objective(
    logp_BT, old_logp_BT, adv_BT, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c
  )
  loss_BT = pg_BT if select_BT is None else select_BT * pg_BT
  if cfg.kl_kind is not None:
    if ref_logp_BT is None:
      raise ValueError(f"kl_kind={cfg.kl_kind!r} needs ref_logp_BT (reference logprobs)")
    kl_BT = kl_penalty(cfg.kl_kind, logp_BT, ref_logp_BT)
    loss_BT = loss_BT + cfg.kl_coef * kl_BT
  else:
    kl_BT = jnp.zeros(logp_BT.shape, jnp.float32)
  if cfg.entropy_coef:
    loss_BT = loss_BT - cfg.entropy_coef * entropy_BT.astype(jnp.float32)
  if valid_BT is not None:
    loss_BT = jnp.where(valid_BT, loss_BT, 0.0)
  sg = jax.lax.stop_gradient
  f32 = lambda x: x.astype(jnp.float32)
  stats = {
    "pg_loss": sg(pg_BT),
    "kl": sg(kl_BT),
    "entropy": sg(f32(entropy_BT)),
    "ratio": sg(jnp.exp(f32(logp_BT) - f32(old_logp_BT))),
    "clip_frac_low": f32(clip.low_BT),
    "clip_frac_high": f32(clip.high_BT),
    "clip_frac_dual": f32(clip.dual_BT),
    "clip_frac": f32(clip.any_BT),
    "approx_kl": sg(kl_k3(old_logp_BT, logp_BT)),
  }
  return loss_BT, stats


def policy_loss(
  logp_BT: jax.Array,
  entropy_BT: jax.Array,
  old_logp_BT: jax.Array,
  advantages: jax.Array,
  mask_BT: jax.Array,
  cfg: LossConfig,
  *,
  ref_logp_BT: jax.Array | None = None,
  sample_mask_B: jax.Array | None = None,
  sum_p2_BT: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss L = sum w * l over the whole batch, and scalar metrics.

  logp_BT / entropy_BT: the current policy's (differentiable); old_logp_BT: the behaviour
  policy's; ref_logp_BT: the reference's (needed when cfg.kl_kind is set); advantages [B] or
  [B, T]; mask_BT: completion tokens; sample_mask_B: rows that get gradient (None = all);
  sum_p2_BT: sum_v p^2 from `token_stats`, which turns on the entropy-gradient diagnostics.
  Token diagnostics are over the training tokens (mask & sample_mask) except "entropy", the
  policy-entropy curve, which is over every completion token.
  """
  mask = mask_BT.astype(bool)
  train = mask if sample_mask_B is None else mask & sample_mask_B.astype(bool)[:, None]
  select_BT = selection_factor(
    cfg.entropy_select, entropy_BT, train, cfg.rho, cfg.high_entropy_weight
  )
  w_BT = aggregation_weights(
    mask,
    cfg.agg_mode,
    sample_mask_B=sample_mask_B,
    exclude_masked_from_denominator=cfg.exclude_masked_from_denominator,
    max_len=cfg.max_len_norm,
  )
  loss_BT, stats = token_loss(
    logp_BT, entropy_BT, old_logp_BT, ref_logp_BT, advantages, cfg, select_BT
  )
  loss = weighted_sum(loss_BT, w_BT)

  metrics = {
    "loss": jax.lax.stop_gradient(loss),
    "pg_loss": weighted_sum(select_BT * stats["pg_loss"], w_BT),
    "kl": weighted_sum(stats["kl"], w_BT),
    "entropy": diag.masked_mean(entropy_BT, mask),
    "entropy_train": diag.masked_mean(entropy_BT, train),
    "ratio_mean": diag.masked_mean(stats["ratio"], train),
    "approx_kl": diag.masked_mean(stats["approx_kl"], train),
    "tokens": jnp.sum(train).astype(jnp.float32),
    "sample_frac": jnp.mean(jnp.any(train, axis=-1).astype(jnp.float32)),
  }
  for name in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "clip_frac"):
    metrics[name] = diag.masked_mean(stats[name], train)
  high_BT = high_entropy_mask(entropy_BT, train, cfg.rho)
  metrics["high_entropy_frac"] = diag.high_entropy_share(high_BT, train)
  if sum_p2_BT is not None:
    adv_BT = _broadcast_adv(advantages, mask.shape)
    clipped = (stats["clip_frac"] > 0) | (select_BT == 0)  # no gradient reaches these tokens
    g_BT = diag.logit_grad_norm(adv_BT, logp_BT, sum_p2_BT, clipped)
    metrics["logit_grad_norm"] = diag.masked_mean(g_BT, train)
    metrics["entropy_grad_corr"] = diag.pearson_corr(g_BT, entropy_BT, train)
    metrics["high_entropy_grad_share"] = diag.high_entropy_share(high_BT, train, g_BT)
  return loss, metrics
