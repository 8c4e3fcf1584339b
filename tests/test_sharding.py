"""egrc_jax.sharding on 8 emulated CPU devices: a (data 1, fsdp 2, tensor 4) mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from egrc_jax.hf import model_from_state_dict
from egrc_jax.hf.layout import layout
from egrc_jax.model import KVCache, ModelConfig, positions_from_mask
from egrc_jax.sharding import (
  batch_sharding,
  init_model,
  make_mesh,
  sampling_dtype,
  sampling_layout_fn,
  sampling_shardings,
  to_sampling_layout,
)

# 4 query heads split over tensor=4; 2 kv heads do not divide 4 and stay replicated.
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=4)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(data=1, fsdp=2, tensor=4)


@pytest.fixture(scope="module")
def tensors():
  rng = np.random.default_rng(0)
  out = {}
  for e in layout(CFG):
    base = 1.0 if e.hf_name.endswith("norm.weight") else 0.0
    out[e.hf_name] = (base + 0.1 * rng.standard_normal(e.hf_shape)).astype(np.float32)
  return out


@pytest.fixture(scope="module")
def models(tensors, mesh):
  return model_from_state_dict(CFG, tensors), model_from_state_dict(CFG, tensors, mesh)


def _spec(var) -> P:
  return var.get_value().sharding.spec


def test_parameters_are_laid_out_by_the_rules(models, mesh):
  _, sharded = models
  attn, mlp = sharded.layers[0].attn, sharded.layers[0].mlp
  assert _spec(attn.q_DNH) == P("fsdp", "tensor", None)
  assert _spec(attn.k_DKH) == P("fsdp", None, None)  # 2 kv heads on tensor=4: replicated
  assert _spec(attn.o_NHD) == P("tensor", None, "fsdp")
  assert _spec(attn.q_bias_NH) == P("tensor", None)
  assert _spec(mlp.gate_DF) == P("fsdp", "tensor")
  assert _spec(mlp.down_FD) == P("tensor", "fsdp")
  assert _spec(sharded.embed_VD) == P("tensor", "fsdp")
  assert _spec(sharded.lm_head_DV) == P("fsdp", "tensor")
  # Each device really holds only its slice: 64/2 x 4/4 x 16 of q, 128/4 x 64/2 of embed.
  assert {s.data.shape for s in attn.q_DNH.get_value().addressable_shards} == {(32, 1, 16)}
  assert {s.data.shape for s in sharded.embed_VD.get_value().addressable_shards} == {(32, 32)}
  assert len(sharded.embed_VD.get_value().sharding.device_set) == 8


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, mask)


@nnx.jit
def _decode(model, tokens, positions, mask, cache):
  return model.decode(tokens, positions, mask, cache)


def _batch():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 8)))
  mask = jnp.arange(8)[None, :] >= jnp.array([0, 3, 1, 5])[:, None]
  return tokens, positions_from_mask(mask), mask


def test_sharded_forward_and_decode_match_one_device(models, mesh):
  single, sharded = models
  tokens, positions, mask = _batch()
  ref = _forward(single, tokens, positions, mask)
  ref_dec, _ = _decode(single, tokens, positions, mask, KVCache.zeros(CFG, 4, 8))
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, batch_sharding(mesh))
    out = _forward(sharded, put(tokens), put(positions), put(mask))
    dec, cache = _decode(sharded, put(tokens), put(positions), put(mask), KVCache.zeros(CFG, 4, 8))
  # Logits stay split: rows over data x fsdp (2), vocab over tensor (4).
  assert out.sharding.shard_shape(out.shape) == (2, 8, CFG.vocab_size // 4)
  m = np.asarray(mask)
  # float32; sharded contractions add partial sums in another order: rounding only.
  np.testing.assert_allclose(np.asarray(out)[m], np.asarray(ref)[m], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dec)[m], np.asarray(ref_dec)[m], atol=1e-5, rtol=1e-5)
  assert int(cache.index) == 8


def test_sharded_init_is_the_same_model_on_any_mesh(mesh):
  fsdp8, sharded = init_model(CFG, make_mesh(1, 8, 1), seed=3), init_model(CFG, mesh, seed=3)
  assert _spec(sharded.layers[1].mlp.up_DF) == P("fsdp", "tensor")
  up = fsdp8.layers[1].mlp.up_DF.get_value()
  assert up.sharding.shard_shape(up.shape) == (64 // 8, 128)
  a = jax.tree.leaves(nnx.state(fsdp8, nnx.Param))
  b = jax.tree.leaves(nnx.state(sharded, nnx.Param))
  for x, y in zip(a, b, strict=True):  # same seed -> same random bits whatever the mesh
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_make_mesh_shapes_and_errors():
  assert dict(make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match=r"= 6 devices, but 8 are available"):
    make_mesh(1, 3, 2)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    make_mesh(-1, -1, 2)


def test_sampling_layout_drops_fsdp_and_casts_to_compute_dtype(mesh):
  cfg = CFG.replace(dtype="bfloat16")  # float32 params, bfloat16 compute (the real configs)
  model = init_model(cfg, mesh, seed=0)
  state = nnx.state(model)
  copy = nnx.merge(nnx.graphdef(model), to_sampling_layout(state, mesh, cfg.jnp_dtype))
  attn, mlp = copy.layers[0].attn, copy.layers[0].mlp
  # The training layout's "embed" (fsdp) splits are gone; tensor splits stay where they divide.
  assert _spec(attn.q_DNH) == P(None, "tensor", None)
  assert _spec(attn.k_DKH) == P(None, None, None)  # 2 kv heads on tensor=4: replicated
  assert _spec(attn.o_NHD) == P("tensor", None, None)
  assert _spec(mlp.down_FD) == P("tensor", None)
  assert _spec(copy.embed_VD) == P("tensor", None)
  assert _spec(copy.lm_head_DV) == P(None, "tensor")
  # The model casts every weight to bfloat16 before use except the RMSNorm scales (they
  # multiply in param dtype), so the copy holds exactly those values: same results.
  assert attn.q_DNH.get_value().dtype == jnp.bfloat16
  assert copy.layers[0].attn_norm.scale.get_value().dtype == jnp.float32
  assert copy.final_norm.scale.get_value().dtype == jnp.float32
  np.testing.assert_array_equal(
    np.asarray(attn.q_DNH.get_value()),
    np.asarray(model.layers[0].attn.q_DNH.get_value().astype(jnp.bfloat16)),
  )
  # One compiled copy per layout: a second rollout reuses it.
  assert sampling_layout_fn(sampling_shardings(state, mesh), jnp.bfloat16) is sampling_layout_fn(
    sampling_shardings(state, mesh), jnp.bfloat16
  )


def test_sampling_dtype_never_widens():
  scale = (jax.tree_util.DictKey("final_norm"), jax.tree_util.DictKey("scale"))
  weight = (jax.tree_util.DictKey("embed_VD"),)
  assert sampling_dtype(weight, jnp.float32, jnp.bfloat16) == jnp.bfloat16
  assert sampling_dtype(weight, jnp.bfloat16, jnp.float32) == jnp.bfloat16  # never widened
  assert sampling_dtype(scale, jnp.float32, jnp.bfloat16) == jnp.float32
  assert sampling_dtype(weight, jnp.int32, jnp.bfloat16) == jnp.int32
