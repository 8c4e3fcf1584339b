"""Loss aggregation over tokens and rows, written as per-token weights.

Shape letters: B rows, C completion length.

Every mode is a weighted sum  L = sum_{b,t} w_bt l_bt  with w_bt = 0 off the training tokens,
so the train step can compute the weights for the whole batch once and accumulate
micro-batch gradients of sum(w * l) exactly. With n_bt = mask_bt * sample_b (the tokens
that get gradient) and d_bt the tokens that count in denominators (d = n by default; d =
mask when excluded rows still count), R = #rows with any d_bt:

  token-mean               w_bt = n_bt / sum_{b,t} d_bt
  seq-mean-token-mean      w_bt = n_bt / (R * sum_t d_bt)
  seq-mean-token-sum-norm  w_bt = n_bt / (R * max_len)          (Dr.GRPO: a constant length)

Empty denominators are replaced by 1 (a batch with no training token has loss 0).
Padding (extra masked tokens or columns, all-masked rows) never changes any weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _masks(mask_BC, sample_mask_B, exclude_masked_from_denominator):
  mask = mask_BC.astype(bool)
  if sample_mask_B is None:
    return mask, mask
  num = mask & sample_mask_B.astype(bool)[:, None]
  return num, (num if exclude_masked_from_denominator else mask)


def aggregation_weights(
  mask_BC: jax.Array,
  mode: str,
  *,
  sample_mask_B: jax.Array | None = None,
  exclude_masked_from_denominator: bool = True,
  max_len: int | None = None,
) -> jax.Array:
  """Per-token weights w_bt [B, C] (float32) of the aggregation `mode` (formulas above).

  sample_mask_B: rows that get gradient (stage 1 positive-only: R > 0); None = all rows.
  exclude_masked_from_denominator: True (default [ours]): excluded rows' tokens do not count
  in denominators; False: they do (so the update is scaled down by the excluded share).
  max_len: the constant length of "seq-mean-token-sum-norm" (the rollout's max_new_tokens).
  """
  num, den = _masks(mask_BC, sample_mask_B, exclude_masked_from_denominator)
  numf = num.astype(jnp.float32)
  if mode == "token-mean":
    return numf / jnp.maximum(jnp.sum(den), 1).astype(jnp.float32)
  row_den_B = jnp.sum(den, axis=-1)
  rows = jnp.maximum(jnp.sum(row_den_B > 0), 1).astype(jnp.float32)
  if mode == "seq-mean-token-mean":
    return numf / (jnp.maximum(row_den_B, 1).astype(jnp.float32)[:, None] * rows)
  if mode == "seq-mean-token-sum-norm":
    if max_len is None or max_len < 1:
      raise ValueError(f"agg mode {mode!r} needs max_len >= 1 (got {max_len}); pass max_len")
    return numf / (float(max_len) * rows)
  raise ValueError(f"aggregation mode {mode!r} is unknown; use one of {AGG_MODES}")


def aggregate(
  loss_BC: jax.Array,
  mask_BC: jax.Array,
  mode: str,
  *,
  sample_mask_B: jax.Array | None = None,
  exclude_masked_from_denominator: bool = True,
  max_len: int | None = None,
) -> jax.Array:
  """Scalar sum_{b,t} w_bt l_bt with `aggregation_weights`. Tokens with w = 0 are dropped by
  `where`, so non-finite values there neither reach the loss nor its gradient."""
  w = aggregation_weights(
    mask_BC,
    mode,
    sample_mask_B=sample_mask_B,
    exclude_masked_from_denominator=exclude_masked_from_denominator,
    max_len=max_len,
  )
  return weighted_sum(loss_BC, w)


def weighted_sum(loss_BC: jax.Array, weight_BC: jax.Array) -> jax.Array:
  """sum w * l over the tokens with w != 0 (exactly zero gradient to the others)."""
  keep = weight_BC != 0
  return jnp.sum(jnp.where(keep, loss_BC.astype(jnp.float32) * weight_BC, 0.0))
