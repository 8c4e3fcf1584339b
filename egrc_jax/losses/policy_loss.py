"""The learner's loss: LossConfig, the per-token loss and its one composition.

Shape letters: B rows (P prompts x G samples, prompt-major), C completion length.

    l_bc = s_bc * ppo_bc + kl_coef * kl_bc - entropy_coef * H_bc         (`token_loss`)
    L    = sum_{b,c} w_bc l_bc                                           (`batch_loss`)

ppo: `ppo_clip_objective`; kl: `kl_penalty(kl_kind)`; s: entropy selection factor
(`selection.py`); w: aggregation weights (`aggregate.py`), zero on padding and on rows
outside the sample mask (stage 1 positive-only), so those rows get exactly zero gradient.
`loss_weights` computes w and s for a whole batch; the train step sums `batch_loss` over
its micro-batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from egrc_jax.losses.aggregate import AGG_MODES, aggregation_weights, weighted_sum
from egrc_jax.losses.selection import SELECT_MODES, selection_factor
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
  logp_BC: jax.Array,
  entropy_BC: jax.Array,
  old_logp_BC: jax.Array,
  ref_logp_BC: jax.Array | None,
  advantages: jax.Array,
  cfg: LossConfig,
  select_BC: jax.Array | None = None,
  valid_BC: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token loss l_bt (module docstring) and per-token statistics (TOKEN_STAT_NAMES).

  advantages: [B] (broadcast over tokens) or [B, C]. select_BC: the entropy selection factor
  s (None = 1), computed for the whole batch beforehand when micro-batching.
  valid_BC: the tokens whose loss counts (weight != 0); elsewhere the behaviour and
  reference logprobs are replaced by the policy's own (ratio 1, KL 0) and the loss is 0. A
  masked-out slot can hold anything (k3's exp(ref - logp) overflows on a pad slot whose ref
  is 0 and logp -100): multiplying by a zero weight does not help, because 0 * inf is NaN in
  the loss and in its gradient.
  """
  if valid_BC is not None:
    valid_BC = valid_BC.astype(bool)
    own = jax.lax.stop_gradient(logp_BC)
    old_logp_BC = jnp.where(valid_BC, old_logp_BC, own)
    if ref_logp_BC is not None:
      ref_logp_BC = jnp.where(valid_BC, ref_logp_BC, own)
  adv_BC = _broadcast_adv(advantages, logp_BC.shape)
  pg_BC, clip = ppo_clip_objective(
    logp_BC, old_logp_BC, adv_BC, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c
  )
  loss_BC = pg_BC if select_BC is None else select_BC * pg_BC
  if cfg.kl_kind is not None:
    if ref_logp_BC is None:
      raise ValueError(f"kl_kind={cfg.kl_kind!r} needs ref_logp_BC (reference logprobs)")
    kl_BC = kl_penalty(cfg.kl_kind, logp_BC, ref_logp_BC)
    loss_BC = loss_BC + cfg.kl_coef * kl_BC
  else:
    kl_BC = jnp.zeros(logp_BC.shape, jnp.float32)
  if cfg.entropy_coef:
    loss_BC = loss_BC - cfg.entropy_coef * entropy_BC.astype(jnp.float32)
  if valid_BC is not None:
    loss_BC = jnp.where(valid_BC, loss_BC, 0.0)
  sg = jax.lax.stop_gradient
  f32 = lambda x: x.astype(jnp.float32)
  stats = {
    "pg_loss": sg(pg_BC),
    "kl": sg(kl_BC),
    "entropy": sg(f32(entropy_BC)),
    "ratio": sg(jnp.exp(f32(logp_BC) - f32(old_logp_BC))),
    "clip_frac_low": f32(clip.low_BC),
    "clip_frac_high": f32(clip.high_BC),
    "clip_frac_dual": f32(clip.dual_BC),
    "clip_frac": f32(clip.any_BC),
    "approx_kl": sg(kl_k3(old_logp_BC, logp_BC)),
  }
  return loss_BC, stats


def loss_weights(
  mask_BC: jax.Array, sample_mask_B: jax.Array | None, entropy_BC: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, jax.Array]:
  """(w_bc, s_bc) of a whole batch, computed once before it is split into micro-batches
  (which makes micro-batching exact): the aggregation weights of cfg.agg_mode over the
  completion tokens of the rows in sample_mask_B (None: all; stage 1: R > 0), and the
  entropy-selection factors, from the behaviour policy's entropies over those same tokens."""
  mask = mask_BC.astype(bool)
  train = mask if sample_mask_B is None else mask & sample_mask_B.astype(bool)[:, None]
  weight_BC = aggregation_weights(
    mask,
    cfg.agg_mode,
    sample_mask_B=sample_mask_B,
    exclude_masked_from_denominator=cfg.exclude_masked_from_denominator,
    max_len=cfg.max_len_norm,
  )
  select_BC = selection_factor(
    cfg.entropy_select, entropy_BC, train, cfg.rho, cfg.high_entropy_weight
  )
  return weight_BC, select_BC


def batch_loss(
  logp_BC: jax.Array,
  entropy_BC: jax.Array,
  old_logp_BC: jax.Array,
  ref_logp_BC: jax.Array | None,
  adv_BC: jax.Array,
  weight_BC: jax.Array,
  select_BC: jax.Array,
  cfg: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = sum_{b,c} w_bc l_bc (module docstring) over a batch or one micro-batch of it, and
  the w-weighted sums of the per-token statistics (TOKEN_STAT_NAMES; divide by sum w for
  the loss-weighted means). The one composition of the loss: the train step's.

  logp / entropy: the current policy's (differentiable); old_logp: the behaviour policy's;
  ref_logp: the reference's (read only when cfg.kl_kind is set); weight / select: from
  `loss_weights`. A token with w = 0 gets exactly zero gradient, whatever its inputs hold.
  """
  ref = ref_logp_BC if cfg.kl_kind is not None else None
  tok_BC, stats = token_loss(
    logp_BC, entropy_BC, old_logp_BC, ref, adv_BC, cfg, select_BC, weight_BC != 0
  )
  sums = {k: weighted_sum(stats[k], weight_BC) for k in TOKEN_STAT_NAMES}
  return weighted_sum(tok_BC, weight_BC), sums
