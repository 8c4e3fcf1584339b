"""Advantage estimators: group-relative (GRPO / Dr.GRPO), absolute (EGRC stage 1), and the
stage-2 decomposed / entangled forms.

Shape letters: P prompts, G samples per prompt, B = P*G rows (prompt-major: row p*G + g).

Std convention: the population standard deviation over the G samples of a group (ddof = 0,
like tunix; sample std would be undefined for G = 1), and eps = 1e-6 added to the std, not
to the variance.

Equal groups: a group whose rewards are all equal gets advantages exactly 0. Float32 rounding
of the mean leaves r - mean(r) of order 1e-7 there, and dividing that by a std of the same
order gives advantages of order 0.1 (8 rewards of -1.2288 gave -0.1065 each), so equality is
tested on the rewards themselves (max == min) rather than trusted to the arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_relative_advantages(
  rewards_PG: jax.Array, std_normalize: bool = True, eps: float = 1e-6
) -> jax.Array:
  """GRPO advantages [P, G].

    A_pg = (r_pg - mean_g r_pg) / (std_g r_pg + eps)   if std_normalize (GRPO)
    A_pg =  r_pg - mean_g r_pg                          otherwise (Dr.GRPO)

  std is the population std (ddof = 0) over the group's G samples; a group whose rewards are
  all equal gets exactly 0 (module docstring).
  """
  r = rewards_PG.astype(jnp.float32)
  equal_P1 = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
  centred = jnp.where(equal_P1, 0.0, r - jnp.mean(r, axis=-1, keepdims=True))
  if not std_normalize:
    return centred
  return centred / (jnp.std(r, axis=-1, keepdims=True) + eps)


def absolute_advantages(rewards_PG: jax.Array, beta: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """EGRC stage 1 [paper]: A = beta * R (no group mean, no std), and the positive-only mask.

  Returns (A [P, G], positive_mask [P, G] = R > 0). Only rows with positive_mask contribute
  gradient (pass it, flattened, as `sample_mask_B` to the loss).
  """
  r = rewards_PG.astype(jnp.float32)
  return beta * r, r > 0


def decomposed_advantages(
  acc_PG: jax.Array,
  len_PG: jax.Array,
  w_len: float,
  std_normalize: bool = True,
  eps: float = 1e-6,
) -> jax.Array:
  """EGRC stage 2 default: each reward normalised in its own group statistics.

  A = norm_G(R_acc) + w_len * norm_G(R_len),   norm_G = `group_relative_advantages`
  """
  return group_relative_advantages(acc_PG, std_normalize, eps) + w_len * group_relative_advantages(
    len_PG, std_normalize, eps
  )


def entangled_advantages(
  acc_PG: jax.Array,
  len_PG: jax.Array,
  w_len: float,
  std_normalize: bool = True,
  eps: float = 1e-6,
) -> jax.Array:
  """Stage 2 with `decompose=False`, and the EE arm: A = norm_G(R_acc + w_len * R_len)."""
  return group_relative_advantages(acc_PG + w_len * len_PG, std_normalize, eps)


def rows_from_groups(x_PG: jax.Array) -> jax.Array:
  """[P, G] -> [B] in the prompt-major row order (row p*G + g)."""
  return x_PG.reshape(-1)


def groups_from_rows(x_B: jax.Array, group_size: int) -> jax.Array:
  """[B] -> [P, G], the inverse of `rows_from_groups`."""
  if x_B.shape[0] % group_size:
    raise ValueError(f"{x_B.shape[0]} rows are not a multiple of group_size={group_size}")
  return x_B.reshape(-1, group_size)
