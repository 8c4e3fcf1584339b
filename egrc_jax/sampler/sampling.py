"""One sampling step as pure functions: logit filters, drawing a token, per-token statistics.

Shape letters: B rows, V vocab, K blocks of the vocab, J tokens per block.

Everything here is sort-free: a full sort of [B, V] logits is by far the slowest op of a CPU
decode step (hundreds of ms at B=64, V=32k), so top-p finds its threshold by bisection over
the float bits of the probabilities and the draw is an inverse-CDF search over vocab blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from egrc_jax.sampler.config import SamplingConfig

_BLOCK = 256  # J: vocab block width of the two-level inverse-CDF search.


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
  """Logits below the k-th largest of their row set to -inf (ties with it are kept)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, top_p: float) -> jax.Array:
  """Keep the smallest set of most probable tokens whose probability mass reaches top_p.

  With p = softmax(logits) and g(c) = sum_v p_v [p_v >= c], the kept set is {v : p_v >= c*},
  c* = max{c : g(c) >= top_p}. g is monotone in c and non-negative floats order like their
  int32 bit patterns, so bisection over the bits finds c* exactly (no sort; at most 31
  passes over [B, V]). It starts at c = (1 - top_p) / V: the tokens below it hold less than
  1 - top_p in total, so they are always dropped. This is the HF rule "drop tokens whose
  ascending cumulative mass is <= 1 - top_p", except that ties with c* are all kept.
  """
  if top_p >= 1.0:
    return logits_BV
  B, V = logits_BV.shape
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  as_f32 = lambda i: jax.lax.bitcast_convert_type(i, jnp.float32)
  floor = jnp.asarray((1.0 - top_p) / V, jnp.float32)
  lo_B = jnp.full((B,), jax.lax.bitcast_convert_type(floor, jnp.int32))  # g(lo) >= top_p
  hi_B = jax.lax.bitcast_convert_type(jnp.max(probs_BV, axis=-1), jnp.int32) + 1  # g(hi) = 0
  lo_B = jnp.minimum(lo_B, hi_B - 1)

  def body(lo_hi):
    lo_B, hi_B = lo_hi
    mid_B = lo_B + (hi_B - lo_B) // 2
    kept_BV = probs_BV >= as_f32(mid_B)[:, None]
    ok_B = jnp.sum(jnp.where(kept_BV, probs_BV, 0.0), axis=-1) >= top_p
    return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B)

  lo_B, _ = jax.lax.while_loop(lambda c: jnp.any(c[1] - c[0] > 1), body, (lo_B, hi_B))
  return jnp.where(probs_BV >= as_f32(lo_B)[:, None], logits_BV, -jnp.inf)


def sampling_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """float32 logits of the sampling distribution: logits / T, then top-k, then top-p
  (removed tokens at -inf). The order is that of HF's warpers."""
  x_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  return top_p_filter(top_k_filter(x_BV, cfg.top_k), cfg.top_p)


def inverse_cdf_sample(probs_BV: jax.Array, u_B: jax.Array) -> jax.Array:
  """Token index t with cdf(t - 1) <= u * total < cdf(t), for u in [0, 1).

  Two levels (block sums, then one block) so the cumulative sums stay short: O(V) work per
  row instead of a [B, V] cumsum. A token of zero probability is never returned.
  """
  B, V = probs_BV.shape
  K = -(-V // _BLOCK)
  p_BKJ = jnp.pad(probs_BV, ((0, 0), (0, K * _BLOCK - V))).reshape(B, K, _BLOCK)
  mass_BK = jnp.sum(p_BKJ, axis=-1)
  cum_BK = jnp.cumsum(mass_BK, axis=-1)
  target_B = u_B * cum_BK[:, -1]
  blocks_K = jnp.arange(K)
  # First block whose cumulative mass exceeds the target; rounding can leave none, then the
  # last block with mass (a zero-mass block never satisfies the strict inequality first).
  last_K = jnp.max(jnp.where(mass_BK > 0, blocks_K, -1), axis=-1)
  blk_B = jnp.where(cum_BK[:, -1] > target_B, jnp.sum(cum_BK <= target_B[:, None], -1), last_K)
  blk_B = jnp.clip(blk_B, 0, K - 1)
  before_B = jnp.take_along_axis(cum_BK - mass_BK, blk_B[:, None], axis=-1)[:, 0]
  inner_B = jnp.maximum(target_B - before_B, 0.0)
  p_BJ = jnp.take_along_axis(p_BKJ, blk_B[:, None, None], axis=1)[:, 0]
  cum_BJ = jnp.cumsum(p_BJ, axis=-1)
  slots_J = jnp.arange(_BLOCK)
  last_J = jnp.max(jnp.where(p_BJ > 0, slots_J, -1), axis=-1)
  idx_B = jnp.where(cum_BJ[:, -1] > inner_B, jnp.sum(cum_BJ <= inner_B[:, None], -1), last_J)
  return (blk_B * _BLOCK + jnp.clip(idx_B, 0, _BLOCK - 1)).astype(jnp.int32)


def argmax(logits_BV: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (first index of the max) as two plain reductions: 4x
  faster on CPU than XLA's variadic (value, index) reduce."""
  return _first_zero(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))


def _first_zero(shifted_BV: jax.Array) -> jax.Array:
  """First index where logits - max == 0, i.e. the argmax, from already-shifted logits."""
  V = shifted_BV.shape[-1]
  first_B = jnp.min(jnp.where(shifted_BV == 0, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first_B, V - 1)  # NaN logits match nothing: stay inside the vocab


def policy_stats(logits_BV: jax.Array):
  """(shifted_BV, log_z_B, entropy_B) of p = softmax(logits) in one fused pass after the max.

  With x = logits - max and z = sum_v e^x_v: log p_v = x_v - log z and the entropy is
  -sum_v p_v log p_v = log z - sum_v e^x_v x_v / z, so no [B, V] log-softmax is written out.
  """
  shifted_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
  e_BV = jnp.exp(shifted_BV)
  z_B = jnp.sum(e_BV, axis=-1)
  # e^x x -> 0 as x -> -inf; the where keeps a -inf logit from making 0 * inf = NaN.
  ex_B = jnp.sum(jnp.where(e_BV > 0, e_BV * shifted_BV, 0.0), axis=-1)
  log_z_B = jnp.log(z_B)
  return shifted_BV, log_z_B, log_z_B - ex_B / z_B


def _take(x_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BV, tokens_B[:, None], axis=-1)[:, 0]


class StepStats(NamedTuple):
  """Statistics of one step's chosen tokens [B] (float32 unless said otherwise).

  logprob: log q(token), q = softmax(sampling_logits): the sampling distribution
    (temperature, then top-k / top-p; 0 when greedy, q being one-hot).
  policy_logprob / entropy: log p(token) and -sum p log p of p = softmax(logits) (T = 1, no
    filter).
  tempered_logprob / tempered_entropy: the same of p_T = softmax(logits / T) (the sampling
    temperature, no filter): what the learner recomputes at the stage temperature. Equal to
    logprob when no filter is on; when greedy they are taken at T = 1.
  """

  logprob: jax.Array
  policy_logprob: jax.Array
  entropy: jax.Array
  tempered_logprob: jax.Array
  tempered_entropy: jax.Array


class Draw(NamedTuple):
  tokens: jax.Array  # int32 [B]
  stats: StepStats


def _filtered(cfg: SamplingConfig) -> bool:
  return cfg.top_k > 0 or cfg.top_p < 1.0


def _distributions(logits_BV, cfg: SamplingConfig):
  """The per-step passes over the vocabulary, each done once: policy_stats of p (T = 1), of
  p_T (shared with p when T = 1) and log q [B, V] (shared with log p_T when no filter;
  None when greedy)."""
  policy = policy_stats(logits_BV)
  if cfg.greedy:
    return policy, policy, None
  tempered = policy if cfg.temperature == 1.0 else policy_stats(logits_BV / cfg.temperature)
  if _filtered(cfg):
    logq_BV = jax.nn.log_softmax(sampling_logits(logits_BV, cfg), axis=-1)
  else:  # q = p_T
    logq_BV = tempered[0] - tempered[1][:, None]
  return policy, tempered, logq_BV


def _stats(tokens_B, policy, tempered, logq_BV) -> StepStats:
  (shifted_BV, log_z_B, entropy_B), (t_shifted_BV, t_log_z_B, t_entropy_B) = policy, tempered
  policy_B = _take(shifted_BV, tokens_B) - log_z_B
  tempered_B = _take(t_shifted_BV, tokens_B) - t_log_z_B
  logq_B = jnp.zeros_like(policy_B) if logq_BV is None else _take(logq_BV, tokens_B)
  return StepStats(logq_B, policy_B, entropy_B, tempered_B, t_entropy_B)


def token_stats(logits_BV: jax.Array, tokens_B: jax.Array, cfg: SamplingConfig) -> StepStats:
  """`StepStats` of chosen tokens under one step's float32 logits."""
  return _stats(tokens_B, *_distributions(logits_BV.astype(jnp.float32), cfg))


def sample_step(logits_BV: jax.Array, keys_B: jax.Array, cfg: SamplingConfig) -> Draw:
  """Draw one token per row. keys_B: one PRNG key per row (only used when sampling).

  Returns Draw(tokens_B int32, StepStats of the drawn tokens).
  """
  policy, tempered, logq_BV = _distributions(logits_BV.astype(jnp.float32), cfg)
  if cfg.greedy:
    tokens_B = _first_zero(policy[0])  # reuses policy_stats' max: one pass fewer
  else:
    u_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)
    tokens_B = inverse_cdf_sample(jnp.exp(logq_BV), u_B)
  return Draw(tokens_B, _stats(tokens_B, policy, tempered, logq_BV))
