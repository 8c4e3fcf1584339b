"""Entropy-conditioned token selection (the "80/20" high-entropy minority tokens).

Shape letters: B rows, C completion length.

The selection is a per-token factor s_bt on the policy-gradient term only (KL and entropy
terms keep every token), with the aggregation denominators unchanged:
  off        s = 1
  restrict   s = 1[H_bt >= tau_rho]                   (only high-entropy tokens learn)
  reweight   s = high_weight if H_bt >= tau_rho else 1
tau_rho is the batch's top-rho entropy quantile over the given mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SELECT_MODES = ("off", "restrict", "reweight")


def high_entropy_mask(entropy_BC: jax.Array, mask_BC: jax.Array, rho: float) -> jax.Array:
  """Bool [B, C]: valid tokens whose entropy is in the batch's top rho fraction.

  k = ceil(rho * n_valid) (at least 1); the threshold is the k-th largest valid entropy and
  every valid token at or above it is selected (ties can select more than k). No gradient.
  """
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"rho={rho} must be in (0, 1] (the high-entropy token fraction)")
  mask = mask_BC.astype(bool)
  h = jax.lax.stop_gradient(entropy_BC).astype(jnp.float32)
  flat = jnp.where(mask, h, -jnp.inf).reshape(-1)
  n = jnp.sum(mask)
  # The (1 - 1e-6) guards against float rounding pushing rho*n just above an integer.
  k = jnp.ceil(rho * n.astype(jnp.float32) * (1.0 - 1e-6)).astype(jnp.int32)
  k = jnp.clip(k, 1, flat.shape[0])
  threshold = jnp.sort(flat)[::-1][k - 1]
  return mask & (h >= threshold)


def restrict_to_high_entropy(high_BC: jax.Array) -> jax.Array:
  """Selection factor s = 1[high] (float32 [B, C])."""
  return high_BC.astype(jnp.float32)


def reweight_high_entropy(high_BC: jax.Array, high_weight: float) -> jax.Array:
  """Selection factor s = high_weight on high-entropy tokens, 1 elsewhere."""
  return jnp.where(high_BC, jnp.float32(high_weight), jnp.float32(1.0))


def selection_factor(
  mode: str, entropy_BC: jax.Array, mask_BC: jax.Array, rho: float, high_weight: float
) -> jax.Array:
  """s_bt for `mode` in SELECT_MODES (see the module docstring)."""
  if mode == "off":
    return jnp.ones(entropy_BC.shape, jnp.float32)
  if mode == "restrict":
    return restrict_to_high_entropy(high_entropy_mask(entropy_BC, mask_BC, rho))
  if mode == "reweight":
    return reweight_high_entropy(high_entropy_mask(entropy_BC, mask_BC, rho), high_weight)
  raise ValueError(f"entropy_select={mode!r} is unknown; use one of {SELECT_MODES}")
