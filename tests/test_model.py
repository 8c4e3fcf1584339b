"""egrc_jax.model: the cached decode path, causality, padding, parameter counts (no torch)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from egrc_jax.model import KVCache, ModelConfig, positions_from_mask
from egrc_jax.sharding import abstract_model, count_params

VARIANTS = {
  # Qwen2: q/k/v bias, untied.
  "qwen2": ModelConfig(vocab_size=128),
  # Qwen3-style qk-norm with llama3 RoPE scaling, o bias and tied embeddings together.
  "mixed": ModelConfig(
    model_type="qwen3",
    vocab_size=128,
    head_dim=32,
    qkv_bias=False,
    o_bias=True,
    qk_norm=True,
    tie_embeddings=True,
    rope_scaling_factor=8.0,
    rope_original_max_position=64,
  ),
}


def random_model(cfg: ModelConfig, seed: int = 0):
  """Every parameter random (numpy, no compilation): zero biases and unit norms, as at
  init, would hide bugs in them. Norm scales are 1 + noise."""
  rng = np.random.default_rng(seed)
  graphdef, abstract = abstract_model(cfg)
  leaves = []
  for path, var in nnx.to_flat_state(abstract):
    x = 0.1 * rng.standard_normal(var.shape) + (1.0 if path[-1] == "scale" else 0.0)
    leaves.append((path, var.replace(jnp.asarray(x, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
  return random_model(VARIANTS[request.param])


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, mask)


@nnx.jit
def _decode(model, tokens, positions, mask, cache):
  return model.decode(tokens, positions, mask, cache)


def _left_padded(vocab: int, B=3, T=10):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (B, T))
  pads = np.array([0, 2, 5])[:B]
  mask = np.arange(T)[None, :] >= pads[:, None]
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_positions_from_mask_counts_real_tokens():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_prefill_then_token_by_token_decode_matches_full_forward(model):
  tokens, mask = _left_padded(model.cfg.vocab_size)
  positions = positions_from_mask(mask)
  full = _forward(model, tokens, positions, mask)
  B, T = tokens.shape
  P = 6  # prompt length; the remaining T - P tokens go one at a time
  cache = KVCache.zeros(model.cfg, B, T + 2)  # spare slots must stay invisible
  logits, cache = _decode(model, tokens[:, :P], positions[:, :P], mask[:, :P], cache)
  steps = [logits]
  for t in range(P, T):
    logits, cache = _decode(
      model, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache
    )
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  assert int(cache.index) == T
  # float32; the cached path sums attention over S slots instead of T: rounding only.
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(cached)[m], np.asarray(full)[m], atol=1e-5, rtol=1e-5)


def test_padding_placement_and_content_do_not_change_real_logits(model):
  tokens, mask = _left_padded(model.cfg.vocab_size)
  logits = _forward(model, tokens, positions_from_mask(mask), mask)
  # Row 2's 5 real tokens again, right-padded in row 0 with other junk in the pad slots.
  tokens2 = tokens.at[0, :5].set(tokens[2, 5:]).at[0, 5:].set(7)
  mask2 = mask.at[0].set(jnp.arange(10) < 5)
  logits2 = _forward(model, tokens2, positions_from_mask(mask2), mask2)
  # float32; same maths in different slots, rounding only.
  np.testing.assert_allclose(logits2[0, :5], logits[2, 5:], atol=1e-5, rtol=1e-5)


def test_causality_changing_token_t_never_changes_earlier_logits(model):
  tokens, mask = _left_padded(model.cfg.vocab_size)
  positions = positions_from_mask(mask)
  base = np.asarray(_forward(model, tokens, positions, mask))
  t = 6  # row 0 has no padding
  changed = tokens.at[0, t].set((tokens[0, t] + 1) % model.cfg.vocab_size)
  out = np.asarray(_forward(model, changed, positions, mask))
  # Masked scores are exactly 0 after softmax, and rows never mix: bitwise equal before t.
  np.testing.assert_array_equal(out[0, :t], base[0, :t])
  np.testing.assert_array_equal(out[1:], base[1:])
  assert np.abs(out[0, t:] - base[0, t:]).max() > 1e-4  # and the change does propagate


def test_kv_cache_repeat_and_nbytes():
  cfg = VARIANTS["qwen2"]
  cache = KVCache.zeros(cfg, 2, 5)
  cache = cache.replace(valid_BS=cache.valid_BS.at[1, 3].set(True))
  rep = cache.repeat(3)
  # Keys are stored [B, K, H, S] and values [B, K, S, H]: both products of a one-token
  # decode step are then plain batched matmuls over the cache.
  assert rep.valid_BS.shape == (6, 5) and rep.k[0].shape == (6, cfg.num_kv_heads, cfg.head_dim, 5)
  assert rep.v[0].shape == (6, cfg.num_kv_heads, 5, cfg.head_dim)
  np.testing.assert_array_equal(rep.valid_BS[:, 3], [0, 0, 0, 1, 1, 1])
  assert cache.nbytes() == 2 * cfg.num_layers * 2 * 5 * cfg.num_kv_heads * cfg.head_dim * 4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_count_from_shapes(name):
  cfg = VARIANTS[name]
  _, abstract = abstract_model(cfg)
  assert count_params(abstract) == cfg.num_params()
