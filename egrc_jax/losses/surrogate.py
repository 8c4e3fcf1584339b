"""Per-token policy-gradient surrogate (PPO-clip with clip-higher and dual clip), KL
estimators against the reference policy, and the entropy bonus.

Shape letters: B rows, C completion length. All returns are per token [B, C] (float32)
unless said otherwise; aggregation over tokens lives in `aggregate.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


class ClipIndicators(NamedTuple):
  """Where the clipped branch is active, i.e. where the surrogate's gradient is zero."""

  low_BC: jax.Array  # A < 0 and r < 1 - eps_low
  high_BC: jax.Array  # A > 0 and r > 1 + eps_high
  dual_BC: jax.Array  # A < 0 and r > c (dual clip; all False when it is off)

  @property
  def any_BC(self) -> jax.Array:
    return self.low_BC | self.high_BC | self.dual_BC


def ppo_clip_objective(
  logp_BC: jax.Array,
  old_logp_BC: jax.Array,
  adv_BC: jax.Array,
  eps_low: float,
  eps_high: float,
  dual_clip_c: float | None = None,
) -> tuple[jax.Array, ClipIndicators]:
  """Per-token PPO-clip loss (to minimise) and clip indicators.

    r_t   = exp(logp_t - old_logp_t)
    l_t   = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))     (clip-higher when
                                                                          eps_high > eps_low)
    dual clip (Ye et al. 2020), for A_t < 0 only:  l_t = min(l_t, -c A_t) = min(l_t, c |A_t|)

  The dual clip bounds the loss of a negative-advantage token whose ratio has run off above
  c (> 1); it is off when `dual_clip_c` is None. old_logp gets no gradient.
  """
  if dual_clip_c is not None and dual_clip_c <= 1.0:
    raise ValueError(f"dual_clip_c={dual_clip_c} must be > 1 (or None to turn dual clip off)")
  old = jax.lax.stop_gradient(old_logp_BC.astype(jnp.float32))
  adv = adv_BC.astype(jnp.float32)
  ratio = jnp.exp(logp_BC.astype(jnp.float32) - old)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = jnp.maximum(-adv * ratio, -adv * clipped)
  low = (adv < 0) & (ratio < 1.0 - eps_low)
  high = (adv > 0) & (ratio > 1.0 + eps_high)
  if dual_clip_c is None:
    dual = jnp.zeros_like(low)
  else:
    dual = (adv < 0) & (ratio > dual_clip_c)
    loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip_c * adv), loss)
  return loss, ClipIndicators(low, high, dual)


def kl_k1(logp_BC: jax.Array, ref_logp_BC: jax.Array) -> jax.Array:
  """k1 = log pi(y_t) - log pi_ref(y_t): unbiased for KL(pi || pi_ref), high variance, may be
  < 0."""
  return logp_BC.astype(jnp.float32) - ref_logp_BC.astype(jnp.float32)


def kl_k2(logp_BC: jax.Array, ref_logp_BC: jax.Array) -> jax.Array:
  """k2 = 0.5 (log pi - log pi_ref)^2: biased, low variance, >= 0."""
  return 0.5 * jnp.square(kl_k1(logp_BC, ref_logp_BC))


def kl_k3(logp_BC: jax.Array, ref_logp_BC: jax.Array) -> jax.Array:
  """k3 = exp(d) - d - 1 with d = log pi_ref - log pi (Schulman): unbiased, >= 0
  (e^d >= 1 + d)."""
  d = ref_logp_BC.astype(jnp.float32) - logp_BC.astype(jnp.float32)
  return jnp.exp(d) - d - 1.0


def kl_penalty(kind: str, logp_BC: jax.Array, ref_logp_BC: jax.Array) -> jax.Array:
  """Per-token KL estimate of the given kind ("k1" | "k2" | "k3"); ref_logp gets no gradient."""
  ref = jax.lax.stop_gradient(ref_logp_BC)
  if kind == "k1":
    return kl_k1(logp_BC, ref)
  if kind == "k2":
    return kl_k2(logp_BC, ref)
  if kind == "k3":
    return kl_k3(logp_BC, ref)
  raise ValueError(f"kl kind {kind!r} is unknown; use one of {KL_KINDS}")


def entropy_bonus(entropy_BC: jax.Array, mask_BC: jax.Array, coef: float) -> jax.Array:
  """Scalar coef * token-mean entropy over mask_BC (subtract it from the loss)."""
  m = mask_BC.astype(bool)
  mean = jnp.sum(jnp.where(m, entropy_BC, 0.0)) / jnp.maximum(jnp.sum(m), 1)
  return coef * mean
