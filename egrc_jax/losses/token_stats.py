"""Per-token log p(target), entropy and collision probability of the (tempered) policy.

Shape letters: B rows, C completion length, D hidden, V vocab, U vocab chunk, N = B*C tokens.

With tempered logits z = (h W) / tau and p = softmax(z):
    log p_a = z_a - lse(z)
    H       = -sum_v p_v log p_v = lse(z) - sum_v p_v z_v
    q       = sum_v p_v^2            (so that ||e_a - p||_2^2 = 1 - 2 p_a + q)

`token_stats` never builds the [N, V] logits: it loops over vocab chunks of U columns with
an online log-sum-exp (running max m, s = sum e^{z-m}, u = sum e^{z-m} z, and
sum e^{2(z-m)}), and its custom VJP recomputes each chunk's logits in the backward pass:

    d log p_a / dz_v = [v = a] - p_v
    d H / dz_v       = -p_v (z_v - E_p[z])
    d q / dz_v       = 2 p_v (p_v - q)

Memory bound (live, beyond inputs and outputs): forward O(N*U) floats for one chunk of
logits plus O(N) running statistics; backward O(N*U) + the gradients' own O(N*D + D*V).
The unchunked path (`token_stats_from_logits`) holds O(N*V) several times over.
The vocab chunk is sliced out of W with a clamped dynamic slice (no padded copy of W); when
U does not divide V, the last chunk overlaps the previous one and its repeated columns are
masked out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStats(NamedTuple):
  logp_BC: jax.Array  # log p(target_t | context), float32
  entropy_BC: jax.Array  # H_t = -sum_v p log p, float32
  sum_p2_BC: jax.Array  # q_t = sum_v p_v^2, float32


def token_stats_from_logits(
  logits_BCV: jax.Array, targets_BC: jax.Array, temperature: float = 1.0
) -> TokenStats:
  """Unchunked reference: the same statistics from materialised logits (must be finite)."""
  z = logits_BCV.astype(jnp.float32) / temperature
  logp_BCV = jax.nn.log_softmax(z, axis=-1)
  p_BCV = jnp.exp(logp_BCV)
  logp_BC = jnp.take_along_axis(logp_BCV, targets_BC[..., None].astype(jnp.int32), -1)[..., 0]
  entropy_BC = -jnp.sum(p_BCV * logp_BCV, axis=-1)
  return TokenStats(logp_BC, entropy_BC, jnp.sum(p_BCV * p_BCV, axis=-1))


def logprobs_and_entropy_from_logits(
  logits_BCV: jax.Array, targets_BC: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """(log p(target) [B, C], entropy [B, C]) of softmax(logits / temperature)."""
  stats = token_stats_from_logits(logits_BCV, targets_BC, temperature)
  return stats.logp_BC, stats.entropy_BC


def _chunk_logits(h_ND, w_DV, tau, i, U: int):
  """Tempered logits of vocab chunk i [N, U], its column ids [U] and validity [U]."""
  V = w_DV.shape[1]
  start = jnp.minimum(i * U, V - U)  # clamp so the slice stays in range (no padding)
  w_DU = jax.lax.dynamic_slice_in_dim(w_DV, start, U, axis=1)
  z_NU = jnp.einsum("nd,du->nu", h_ND, w_DU, preferred_element_type=jnp.float32) / tau
  cols_U = start + jnp.arange(U)
  return z_NU, w_DU, cols_U, cols_U >= i * U, start


def _forward(h_ND, w_DV, t_N, tau, U: int):
  N, V = h_ND.shape[0], w_DV.shape[1]
  n_chunks = -(-V // U)

  def body(i, carry):
    m, s, u, q, za = carry
    z, _, cols, valid, _ = _chunk_logits(h_ND, w_DV, tau, i, U)
    m_new = jnp.maximum(m, jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1))
    scale = jnp.exp(m - m_new)  # m = -inf on the first chunk gives 0, m_new is finite
    e = jnp.where(valid, jnp.exp(z - m_new[:, None]), 0.0)
    s = s * scale + jnp.sum(e, -1)
    u = u * scale + jnp.sum(e * jnp.where(valid, z, 0.0), -1)
    q = q * scale * scale + jnp.sum(e * e, -1)
    hit = valid & (cols == t_N[:, None])
    za = za + jnp.sum(jnp.where(hit, z, 0.0), -1)
    return m_new, s, u, q, za

  zeros = jnp.zeros((N,), jnp.float32)
  init = (jnp.full((N,), -jnp.inf, jnp.float32), zeros, zeros, zeros, zeros)
  m, s, u, q, za = jax.lax.fori_loop(0, n_chunks, body, init)
  lse = m + jnp.log(s)
  mean_z = u / s
  return za - lse, lse - mean_z, q / (s * s), lse, mean_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(h_ND, w_DV, t_N, tau, U: int):
  logp, ent, q, _, _ = _forward(h_ND, w_DV, t_N, tau, U)
  return logp, ent, q


def _chunked_fwd(h_ND, w_DV, t_N, tau, U: int):
  logp, ent, q, lse, mean_z = _forward(h_ND, w_DV, t_N, tau, U)
  return (logp, ent, q), (h_ND, w_DV, t_N, tau, lse, mean_z, q)


def _chunked_bwd(U: int, res, g):
  h_ND, w_DV, t_N, tau, lse, mean_z, q = res
  g_lp, g_h, g_q = (x.astype(jnp.float32)[:, None] for x in g)
  n_chunks = -(-w_DV.shape[1] // U)

  def body(i, carry):
    dh_ND, dw_DV = carry
    z, w_DU, cols, valid, start = _chunk_logits(h_ND, w_DV, tau, i, U)
    p = jnp.where(valid, jnp.exp(z - lse[:, None]), 0.0)
    onehot = (valid & (cols == t_N[:, None])).astype(jnp.float32)
    dz = g_lp * (onehot - p) - g_h * p * (z - mean_z[:, None]) + 2.0 * g_q * p * (p - q[:, None])
    dz = jnp.where(valid, dz, 0.0) / tau  # z = hW / tau
    dh_ND = dh_ND + jnp.einsum(
      "nu,du->nd", dz.astype(w_DV.dtype), w_DU, preferred_element_type=jnp.float32
    )
    dw_DU = jnp.einsum("nd,nu->du", h_ND, dz.astype(h_ND.dtype), preferred_element_type=jnp.float32)
    # Each column is valid in exactly one chunk: keep what an earlier chunk wrote elsewhere.
    old_DU = jax.lax.dynamic_slice_in_dim(dw_DV, start, U, axis=1)
    new_DU = jnp.where(valid[None, :], dw_DU.astype(dw_DV.dtype), old_DU)
    return dh_ND, jax.lax.dynamic_update_slice_in_dim(dw_DV, new_DU, start, axis=1)

  init = (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros_like(w_DV))
  dh_ND, dw_DV = jax.lax.fori_loop(0, n_chunks, body, init)
  # Not differentiated w.r.t. the temperature; targets are integers (no cotangent).
  return dh_ND.astype(h_ND.dtype), dw_DV, None, jnp.zeros_like(tau)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_stats(
  hidden_BCD: jax.Array,
  w_DV: jax.Array,
  targets_BC: jax.Array,
  temperature: float | jax.Array = 1.0,
  chunk_size: int = 8192,
) -> TokenStats:
  """Vocab-chunked `TokenStats` of softmax((hidden @ w) / temperature) at `targets_BC`.

  Differentiable w.r.t. hidden and w (custom VJP, see the module docstring), not w.r.t.
  the temperature. Logits are accumulated in float32 whatever the input dtype. A target
  outside [0, V) gets log p = -lse (meaningless; mask such tokens out).
  """
  B, C, D = hidden_BCD.shape
  if w_DV.shape[0] != D:
    raise ValueError(f"w_DV has shape {w_DV.shape}; its first axis must be D={D} (hidden)")
  if targets_BC.shape != (B, C):
    raise ValueError(f"targets_BC has shape {targets_BC.shape}; expected {(B, C)}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be a positive number of vocab columns")
  U = min(int(chunk_size), w_DV.shape[1])
  tau = jnp.asarray(temperature, jnp.float32)
  logp, ent, q = _chunked(
    hidden_BCD.reshape(B * C, D), w_DV, targets_BC.reshape(B * C).astype(jnp.int32), tau, U
  )
  return TokenStats(logp.reshape(B, C), ent.reshape(B, C), q.reshape(B, C))


def token_logprobs_and_entropy(
  hidden_BCD: jax.Array,
  w_DV: jax.Array,
  targets_BC: jax.Array,
  temperature: float | jax.Array = 1.0,
  chunk_size: int = 8192,
) -> tuple[jax.Array, jax.Array]:
  """(log p(target) [B, C], entropy [B, C]), vocab-chunked; see `token_stats`."""
  stats = token_stats(hidden_BCD, w_DV, targets_BC, temperature, chunk_size)
  return stats.logp_BC, stats.entropy_BC
