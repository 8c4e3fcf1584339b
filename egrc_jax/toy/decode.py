"""Batched sampling for the toy evaluation.

TEMPORARY: a minimal prefill + `lax.while_loop` decode over `Transformer.decode` and its
KVCache, kept only until `egrc_jax.sampler.generate` is in place; the toy evaluation should
then call the real sampler instead.

Shape letters: B batch, P prompt length (left padded), N new tokens, S = P + N cache slots,
V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax.model import KVCache, Transformer, positions_from_mask


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_BP (left padded) and mask_BP (True on real tokens)."""
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  mask = np.zeros((len(prompts), P), bool)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p) :] = p
    mask[i, P - len(p) :] = True
  return tokens, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _sample(graphdef, state, tokens_BP, mask_BP, key, temperature, *, max_new_tokens, eos_id,
            pad_id):  # fmt: skip
  model = nnx.merge(graphdef, state)
  B, P = tokens_BP.shape
  cache = KVCache.zeros(model.cfg, B, P + max_new_tokens)
  logits_BPV, cache = model.decode(tokens_BP, positions_from_mask(mask_BP), mask_BP, cache)
  next_pos_B = jnp.sum(mask_BP, axis=1).astype(jnp.int32)

  def pick(logits_BV, k):
    # temperature 0 means greedy; the division is guarded so it stays finite.
    sampled = jax.random.categorical(k, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)

  def cond(carry):
    t, _, _, done_B, _, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    t, logits_BV, cache, done_B, out_BN, pos_B, key = carry
    key, k = jax.random.split(key)
    tok_B = jnp.where(done_B, pad_id, pick(logits_BV, k))
    out_BN = out_BN.at[:, t].set(tok_B)
    live_B1 = ~done_B[:, None]
    logits_B1V, cache = model.decode(tok_B[:, None], pos_B[:, None], live_B1, cache)
    done_B = done_B | (tok_B == eos_id)
    return t + 1, logits_B1V[:, 0], cache, done_B, out_BN, pos_B + 1, key

  out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
  carry = (0, logits_BPV[:, -1], cache, jnp.zeros((B,), bool), out_BN, next_pos_B, key)
  return jax.lax.while_loop(cond, body, carry)[4]


def sample(
  model: Transformer,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float,
  eos_id: int,
  pad_id: int,
  seed: int = 0,
) -> list[list[int]]:
  """Completions (up to and including <eos>, or max_new_tokens long when truncated)."""
  graphdef, state = nnx.split(model)
  tokens, mask = left_pad(prompts, pad_id)
  out = _sample(
    graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
    jnp.float32(temperature), max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
  )  # fmt: skip
  completions = []
  for row in np.asarray(out).tolist():
    n = row.index(eos_id) + 1 if eos_id in row else len(row)
    completions.append(row[:n])
  return completions
