"""egrc_jax.model: the cached decode path, causality, padding, packed rows, attention
implementations at model level, the compute dtype, parameter counts (no torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from egrc_jax.model import (
  KVCache,
  ModelConfig,
  positions_from_mask,
  positions_from_segments,
)
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


# -- attention implementations, packed rows, prefill --------------------------------------


def _impl(model, **kw):
  """The same weights under another attention config (the config is static model data)."""
  return nnx.merge(abstract_model(model.cfg.replace(**kw))[0], nnx.state(model))


def test_blocked_forward_matches_dense(model):
  tokens, mask = _left_padded(model.cfg.vocab_size)
  positions = positions_from_mask(mask)
  dense = np.asarray(_forward(_impl(model, attention_impl="dense"), tokens, positions, mask))
  # Blocks of 4 over T = 10: 3 query blocks, the diagonal ones partly masked, padded to 12.
  blocked = _impl(model, attention_impl="blocked", attention_block_q=4, attention_block_kv=4)
  out = np.asarray(_forward(blocked, tokens, positions, mask))
  # float32; online softmax sums in another order: rounding only (seen 2e-6).
  m = np.asarray(mask)
  np.testing.assert_allclose(out[m], dense[m], atol=1e-5, rtol=1e-5)


def test_positions_from_segments_restart_per_sequence():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
  expected = [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3, 4, 5]]
  np.testing.assert_array_equal(positions_from_segments(seg), expected)
  # On padded rows it agrees with positions_from_mask.
  np.testing.assert_array_equal(positions_from_segments(seg[1:]), positions_from_mask(seg[1:]))


@nnx.jit
def _forward_packed(model, tokens, positions, segment_ids):
  return model(tokens, positions, segment_ids_BT=segment_ids)


@pytest.mark.parametrize("impl", ["dense", "blocked"])
def test_packed_rows_give_the_logits_of_separate_sequences(model, impl):
  rng = np.random.default_rng(3)
  lengths = (5, 9, 4)
  seqs = [rng.integers(0, model.cfg.vocab_size, n) for n in lengths]
  T = 20  # three sequences and a 2-slot pad tail
  seg = np.zeros((1, T), np.int32)
  seg[0, : sum(lengths)] = np.repeat(np.arange(1, 4), lengths)
  tokens = np.zeros((1, T), np.int32)
  tokens[0, : sum(lengths)] = np.concatenate(seqs)
  m = _impl(model, attention_impl=impl, attention_block_q=4, attention_block_kv=4)
  seg = jnp.asarray(seg)
  packed = np.asarray(_forward_packed(m, jnp.asarray(tokens), positions_from_segments(seg), seg))
  # Each sequence alone, right-padded to T, in the same batch.
  alone = np.zeros((3, T), np.int32)
  mask = np.zeros((3, T), bool)
  for i, s in enumerate(seqs):
    alone[i, : len(s)], mask[i, : len(s)] = s, True
  mask = jnp.asarray(mask)
  sep = np.asarray(_forward(m, jnp.asarray(alone), positions_from_mask(mask), mask))
  starts = np.cumsum((0,) + lengths[:-1])
  for i, (s0, n) in enumerate(zip(starts, lengths, strict=True)):
    # float32; the same maths at other slots of other rows: rounding only.
    np.testing.assert_allclose(packed[0, s0 : s0 + n], sep[i, :n], atol=1e-5, rtol=1e-5)


def test_mask_or_segment_ids_exactly_one(model):
  tokens, mask = _left_padded(model.cfg.vocab_size)
  with pytest.raises(ValueError, match="exactly one"):
    model(tokens, positions_from_mask(mask))
  with pytest.raises(ValueError, match="exactly one"):
    model(tokens, positions_from_mask(mask), mask, segment_ids_BT=mask.astype(jnp.int32))


@nnx.jit
def _prefill(model, tokens, positions, mask, cache):
  return model.prefill(tokens, positions, mask, cache)


def test_prefill_through_blocked_attention_then_decode_matches_full_forward(model):
  tokens, mask = _left_padded(model.cfg.vocab_size)
  positions = positions_from_mask(mask)
  full = _forward(_impl(model, attention_impl="dense"), tokens, positions, mask)
  m = _impl(model, attention_impl="blocked", attention_block_q=4, attention_block_kv=4)
  B, T = tokens.shape
  P = 6
  cache = KVCache.zeros(m.cfg, B, T + 2)
  logits, cache = _prefill(m, tokens[:, :P], positions[:, :P], mask[:, :P], cache)
  # The prefill wrote what the cached (dense) path writes, at every valid slot (pad slots
  # hold other junk: pad queries now attend to nothing). float32 rounding only.
  empty = KVCache.zeros(m.cfg, B, T + 2)
  _, ref_cache = _decode(m, tokens[:, :P], positions[:, :P], mask[:, :P], empty)
  np.testing.assert_array_equal(cache.valid_BS, ref_cache.valid_BS)
  valid = np.asarray(cache.valid_BS)
  for k, ref in zip(cache.k, ref_cache.k, strict=True):  # [B, K, H, S]
    got, want = np.moveaxis(np.asarray(k), 3, 1), np.moveaxis(np.asarray(ref), 3, 1)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)
  for v, ref in zip(cache.v, ref_cache.v, strict=True):  # [B, K, S, H]
    got, want = np.moveaxis(np.asarray(v), 2, 1), np.moveaxis(np.asarray(ref), 2, 1)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)
  steps = [logits]
  for t in range(P, T):
    logits, cache = _decode(
      m, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache
    )
    steps.append(logits)
  cached = np.asarray(jnp.concatenate(steps, axis=1))
  assert int(cache.index) == T
  # float32; blocked prefill, then cached decode, against the dense full forward: rounding.
  mk = np.asarray(mask)
  np.testing.assert_allclose(cached[mk], np.asarray(full)[mk], atol=1e-5, rtol=1e-5)


def test_attention_settings_stay_out_of_config_json():
  from egrc_jax.hf import config_from_hf, config_to_hf

  cfg = VARIANTS["qwen2"]
  other = cfg.replace(attention_impl="dense", attention_block_q=128, attention_block_b=2)
  assert config_to_hf(other) == config_to_hf(cfg)
  assert not any("attention_impl" in k or "block" in k for k in config_to_hf(other))
  assert config_from_hf(config_to_hf(other)) == cfg  # read back: the defaults
  with pytest.raises(ValueError, match="attention_impl"):
    cfg.replace(attention_impl="flash")


# -- compute dtype ------------------------------------------------------------------------


def dot_operand_dtypes(closed_jaxpr) -> set:
  """{(lhs dtype, rhs dtype)} of every dot_general, inner jaxprs (loops, conds, custom
  VJPs, remat, nested jits) included."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("impl", ["dense", "blocked"])
def test_bfloat16_compute_with_float32_params(impl):
  cfg = VARIANTS["mixed"].replace(param_dtype="float32", dtype="bfloat16", attention_impl=impl)
  m = random_model(cfg)
  tokens, mask = _left_padded(cfg.vocab_size)
  positions = positions_from_mask(mask)
  hidden = jax.eval_shape(lambda: m(tokens, positions, mask, return_hidden=True))
  assert hidden.dtype == jnp.bfloat16
  assert jax.eval_shape(lambda: m(tokens, positions, mask)).dtype == jnp.float32  # logits
  bf16 = {("bfloat16", "bfloat16")}
  assert dot_operand_dtypes(jax.make_jaxpr(lambda: m(tokens, positions, mask))()) == bf16
  cache = KVCache.zeros(cfg, 3, 12)
  step = lambda: m.prefill(tokens, positions, mask, cache)[1]
  assert dot_operand_dtypes(jax.make_jaxpr(step)()) == bf16
  c = jax.eval_shape(step)
  one = lambda c: m.decode(tokens[:, :1], positions[:, :1], mask[:, :1], c)
  assert dot_operand_dtypes(jax.make_jaxpr(one)(c)) == bf16
