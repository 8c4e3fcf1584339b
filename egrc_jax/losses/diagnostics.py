"""Diagnostics of the update and of the entropy conflict: pure functions returning scalars
(or per-token arrays that feed them). Nothing here is differentiated.

Shape letters: B rows, C completion length, K connector token ids.

All means are over the valid tokens of mask_BC; an empty mask gives 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from egrc_jax.losses.surrogate import ClipIndicators, kl_k3


def masked_mean(x_BC: jax.Array, mask_BC: jax.Array) -> jax.Array:
  """sum(x over mask) / max(#mask, 1)."""
  m = mask_BC.astype(bool)
  x = jax.lax.stop_gradient(x_BC).astype(jnp.float32)
  return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1)


def clip_fractions(clip: ClipIndicators, mask_BC: jax.Array) -> dict[str, jax.Array]:
  """Fractions of valid tokens clipped low / high / by the dual clip, and any of them."""
  return {
    "clip_frac_low": masked_mean(clip.low_BC, mask_BC),
    "clip_frac_high": masked_mean(clip.high_BC, mask_BC),
    "clip_frac_dual": masked_mean(clip.dual_BC, mask_BC),
    "clip_frac": masked_mean(clip.any_BC, mask_BC),
  }


def approx_kl(logp_BC: jax.Array, old_logp_BC: jax.Array, mask_BC: jax.Array) -> jax.Array:
  """KL(pi_old || pi_theta) estimated on pi_old's samples with k3:
  mean_t [exp(logp - old) - (logp - old) - 1] = mean_t [(r - 1) - log r]."""
  return masked_mean(kl_k3(old_logp_BC, logp_BC), mask_BC)


def high_entropy_share(
  high_BC: jax.Array, mask_BC: jax.Array, weight_BC: jax.Array | None = None
) -> jax.Array:
  """Share of valid tokens that are high-entropy (weight None), or share of sum(weight) that
  they carry (e.g. weight = `logit_grad_norm`: the high-entropy tokens' gradient share)."""
  m = mask_BC.astype(bool)
  w = jnp.ones(m.shape, jnp.float32) if weight_BC is None else weight_BC.astype(jnp.float32)
  w = jnp.where(m, jax.lax.stop_gradient(w), 0.0)
  total = jnp.sum(w)
  return jnp.where(total > 0, jnp.sum(jnp.where(high_BC, w, 0.0)) / total, 0.0)


def logit_grad_norm(
  adv_BC: jax.Array,
  logp_BC: jax.Array,
  sum_p2_BC: jax.Array,
  clipped_BC: jax.Array,
  ratio_BC: jax.Array | None = None,
) -> jax.Array:
  """Per-token norm of d l_t / d z_t (z the tempered logits) [B, C] [paper, Fig. 3d]:

    g_t = |A_t| * ||e_{a_t} - p_t||_2 = |A_t| * sqrt(1 - 2 p_{a_t} + sum_v p_v^2),
    and 0 where PPO clipping stops the gradient (`clipped_BC`).

  This is the norm of the PPO-clip term's gradient at r = 1 (on-policy); pass ratio_BC to
  get the exact off-policy norm r_t * g_t. Gradients w.r.t. raw logits carry a 1/temperature.
  """
  p_a = jnp.exp(logp_BC.astype(jnp.float32))
  sq = jnp.maximum(1.0 - 2.0 * p_a + sum_p2_BC.astype(jnp.float32), 0.0)
  g = jnp.abs(adv_BC.astype(jnp.float32)) * jnp.sqrt(sq)
  if ratio_BC is not None:
    g = g * ratio_BC.astype(jnp.float32)
  return jax.lax.stop_gradient(jnp.where(clipped_BC, 0.0, g))


def pearson_corr(x_BC: jax.Array, y_BC: jax.Array, mask_BC: jax.Array) -> jax.Array:
  """Pearson r of x and y over the valid tokens (0 when either is constant there):

  r = sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 * sum (y - my)^2)
  """
  m = mask_BC.astype(bool)
  x = jax.lax.stop_gradient(x_BC).astype(jnp.float32)
  y = jax.lax.stop_gradient(y_BC).astype(jnp.float32)
  dx = jnp.where(m, x - masked_mean(x, m), 0.0)  # centre first: better conditioned in float32
  dy = jnp.where(m, y - masked_mean(y, m), 0.0)
  denom = jnp.sqrt(jnp.sum(dx * dx) * jnp.sum(dy * dy))
  return jnp.where(denom > 0, jnp.sum(dx * dy) / jnp.where(denom > 0, denom, 1.0), 0.0)


def connector_mask(tokens_BC: jax.Array, connector_ids_K: jax.Array) -> jax.Array:
  """Bool [B, C]: the token id is one of the connector ids."""
  ids = jnp.asarray(connector_ids_K, dtype=tokens_BC.dtype).reshape(-1)
  return jnp.any(tokens_BC[..., None] == ids, axis=-1)


def connector_entropy(
  entropy_BC: jax.Array, tokens_BC: jax.Array, mask_BC: jax.Array, connector_ids_K: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(mean entropy over valid connector tokens, mean entropy over the other valid tokens)."""
  m = mask_BC.astype(bool)
  conn = connector_mask(tokens_BC, connector_ids_K)
  return masked_mean(entropy_BC, m & conn), masked_mean(entropy_BC, m & ~conn)
