"""egrc_jax.model.attention: every implementation against dense, forward and gradients.

One batch holds every row layout the learner meets: left-padded, right-padded, packed (three
sequences and a pad tail) and fully padded. Tolerances are float32 summation-order rounding
(outputs and gradients are O(1): seen <= 4e-6).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from egrc_jax.model import attention, blocked_attention
from egrc_jax.sharding import make_mesh

T = 40  # not a multiple of the block sizes below: the last block and chunk are short
TOL = 2e-5  # float32; online softmax and the blocked backward sum in another order

# Rows: left-padded (7 pads), right-padded (11 pads), packed (lengths 9, 16, 10, 5 pads),
# fully padded.
SEGMENTS = np.zeros((4, T), np.int32)
SEGMENTS[0, 7:] = 1
SEGMENTS[1, :29] = 1
SEGMENTS[2, :9], SEGMENTS[2, 9:25], SEGMENTS[2, 25:35] = 1, 2, 3


def _inputs(K=2, N=4, H=8, seed=0):
  rng = np.random.default_rng(seed)
  B = SEGMENTS.shape[0]
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)  # a random cotangent
  return q, k, v, w, jnp.asarray(SEGMENTS)


def _value_and_grads(fn, q, k, v, w, seg):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w)
  out = jax.jit(fn)(q, k, v, seg)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return out, grads


def _naive(q, k, v, seg, causal=True):
  """Float64 loops straight from the definition: softmax over the allowed keys, 0 if none."""
  q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
  B, T, N, H = q.shape
  G = N // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      keys = [s for s in range(T) if seg[b, s] == seg[b, t] != 0 and (s <= t or not causal)]
      for n in range(N):
        if keys:
          z = np.array([q[b, t, n] @ k[b, s, n // G] for s in keys]) / np.sqrt(H)
          p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
          out[b, t, n] = p @ v[b, keys, n // G]
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_dense_matches_the_definition(causal):
  q, k, v, _, seg = _inputs()
  out = attention.dense(q, k, v, seg, causal=causal)
  # float32 against float64 loops: rounding only.
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, seg, causal), atol=1e-5)
  assert np.all(np.asarray(out)[3] == 0)  # the fully padded row


BLOCKED = {
  "16x16": dict(block_q=16, block_kv=16),  # 3 query blocks x up to 3 chunks; short tails
  "8x24-two-rows": dict(block_q=8, block_kv=24, block_b=2),  # chunks cut off-grid by the
  # causal limit; lax.map over 2 chunks of 2 rows
  "one-chunk": dict(block_q=16, block_kv=512),  # each block against its whole prefix
  "one-block": dict(block_q=64, block_kv=64),  # both larger than T
  "per-row": dict(block_q=16, block_kv=16, block_b=1),  # lax.map over single rows
}
CASES = [(name, True) for name in BLOCKED] + [("16x16", False), ("one-block", False)]


@pytest.mark.parametrize("name, causal", CASES)
def test_blocked_matches_dense(name, causal):
  q, k, v, w, seg = _inputs()
  fn = functools.partial(attention.blocked, causal=causal, **BLOCKED[name])
  out, grads = _value_and_grads(fn, q, k, v, w, seg)
  ref, ref_grads = _value_and_grads(
    functools.partial(attention.dense, causal=causal), q, k, v, w, seg
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL)
  for g, r, what in zip(grads, ref_grads, "qkv", strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, err_msg=f"d{what}")


@pytest.mark.parametrize("K", [1, 4])  # MQA and plain multi-head (K = 2 above)
def test_blocked_gqa_head_groups(K):
  q, k, v, w, seg = _inputs(K=K)
  fn = functools.partial(attention.blocked, block_q=16, block_kv=16)
  out, grads = _value_and_grads(fn, q, k, v, w, seg)
  ref, ref_grads = _value_and_grads(attention.dense, q, k, v, w, seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL)


def test_fully_padded_rows_give_zero_output_and_gradients():
  q, k, v, w, seg = _inputs()
  for fn in (attention.dense, functools.partial(attention.blocked, block_q=16, block_kv=16)):
    out, (dq, dk, dv) = _value_and_grads(fn, q, k, v, w, seg)
    for x in (out, dq, dk, dv):
      assert np.all(np.isfinite(np.asarray(x)))
      assert np.all(np.asarray(x)[3] == 0)  # row 3 is all padding
    # Pads inside real rows: no output, and their keys/values get no gradient.
    pads = np.asarray(seg) == 0
    assert np.all(np.asarray(out)[pads] == 0)
    assert np.all(np.asarray(dk)[pads] == 0) and np.all(np.asarray(dv)[pads] == 0)


def test_blocked_skips_blocks_without_a_common_segment():
  """NaN keys/values in key chunks that some query blocks do not need: a computed pair
  would turn them into NaN outputs (p = 0 times NaN), so outputs equal to dense (on clean
  inputs) prove the pair was skipped, per row with block_b=1."""
  seg = np.zeros((2, 24), np.int32)
  seg[0, 8:] = 1  # 8 pads, then one sequence
  seg[1, :12], seg[1, 12:20] = 1, 2  # packed: segment 1 fills chunk [0, 8); a pad tail
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((2, 24, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 8)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  nan = lambda x: x.at[:, :8].set(jnp.nan)  # chunk [0, 8) of both rows
  seg = jnp.asarray(seg)
  fn = functools.partial(attention.blocked, block_q=8, block_kv=8, block_b=1)
  out, grads = _value_and_grads(fn, q, nan(k), nan(v), w, seg)
  ref, ref_grads = _value_and_grads(attention.dense, q, k, v, w, seg)
  # Row 0's real queries never need chunk 0, nor does row 1's query block 2 (segment 2
  # only; block 1 also holds segment 1, so it runs there).
  rows = np.asarray(seg) == np.array([[1], [2]])
  rows[1, :16] = False
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=TOL)
  np.testing.assert_allclose(np.asarray(grads[0])[rows], np.asarray(ref_grads[0])[rows], atol=TOL)
  # Stepping over both rows at once, row 1's block 1 needs chunk 0, so it runs for row 0 too.
  whole = functools.partial(attention.blocked, block_q=8, block_kv=8, block_b=2)
  out_whole = np.asarray(jax.jit(whole)(q, nan(k), nan(v), seg))
  assert np.isnan(out_whole[0, 8:16]).all() and not np.isnan(out_whole[0, 16:]).any()


def test_causal_key_loop_stops_at_the_diagonal_and_blocks_tile_t():
  # T = 40 in blocks of 16: query blocks [0,16), [16,32), [32,48) visit 1, 2, 3 key blocks.
  n_kv = [int(blocked_attention._num_kv_blocks(i, 16, 16, 3, True)) for i in range(3)]
  assert n_kv == [1, 2, 3]
  assert [int(blocked_attention._num_kv_blocks(i, 8, 24, 2, True)) for i in range(6)] == [
    1, 1, 1, 2, 2, 2,
  ]  # fmt: skip
  assert blocked_attention._num_kv_blocks(0, 16, 16, 3, False) == 3
  # Default blocks: about 64 slots, evened out (224 = 4 x 56, 100 = 2 x 50, 40 = 1 x 40).
  assert [blocked_attention.balanced_block(t) for t in (224, 100, 40, 65)] == [56, 50, 40, 33]


# -- splash (Pallas interpret mode on CPU) -------------------------------------------------


def test_splash_matches_dense_in_interpret_mode():
  """T = 256 with blocks of 128 (the kernel's lane width): 2 x 2 blocks, causal skip."""
  seg = np.zeros((3, 256), np.int32)
  seg[0, 50:] = 1  # left-padded
  seg[1, :100], seg[1, 100:180], seg[1, 180:250] = 1, 2, 3  # packed, pad tail
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((3, 256, 4, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((3, 256, 2, 32)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  fn = functools.partial(attention.splash, block_q=128, block_kv=128, interpret=True)
  out, grads = _value_and_grads(fn, q, k, v, w, jnp.asarray(seg))
  ref, ref_grads = _value_and_grads(attention.dense, q, k, v, w, jnp.asarray(seg))
  # float32 in both; the kernel accumulates in another order: rounding only (seen 3e-6).
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL)
  for g, r, what in zip(grads, ref_grads, "qkv", strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, err_msg=f"d{what}")
  assert np.all(np.asarray(out)[2] == 0) and np.all(np.asarray(grads[1])[2] == 0)
  # Under a mesh the kernel runs per shard (shard_map): rows over fsdp, heads over tensor.
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  idx = np.array([0, 1, 2, 0])  # 4 rows: one per data x fsdp shard
  with jax.set_mesh(mesh):
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(x[idx], rows) for x in (q, k, v, jnp.asarray(seg))]
    sharded = jax.jit(fn)(*args)
  assert sharded.sharding.spec[2] == "tensor"
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(ref)[idx], atol=TOL)


@pytest.mark.parametrize(
  "T, bq, bk, bad",
  [(224, None, None, "block_q=224"), (256, 96, 128, "block_q=96"), (512, 256, 384, "block_kv")],
)
def test_splash_block_sizes_are_validated(T, bq, bk, bad):
  with pytest.raises(ValueError, match=bad):
    attention.splash_blocks(T, bq, bk)
  assert attention.splash_blocks(1024, None, 256) == (512, 256)


def test_auto_is_blocked_off_tpu_and_unknown_impl_is_refused():
  assert jax.default_backend() == "cpu"
  assert attention.resolve_impl("auto", 256) == "blocked"
  assert attention.resolve_impl("splash", 224) == "splash"  # explicit: splash then refuses
  with pytest.raises(ValueError, match="flash"):
    attention.resolve_impl("flash", 256)


def test_auto_follows_the_mesh_platform_for_ahead_of_time_tpu_compiles():
  """A trace under a mesh of TPU topology devices (AOT from this CPU host) picks splash."""
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    devices = topologies.get_topology_desc("v4:2x2x1", "tpu").devices
  except Exception as e:  # noqa: BLE001 (no libtpu here: nothing to check)
    pytest.skip(f"no TPU topology available: {e}")
  mesh = jax.sharding.Mesh(np.array(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  seen = {}

  def probe(x):
    seen["auto"] = attention.resolve_impl("auto", 256), attention.resolve_impl("auto", 224)
    seen["rows"] = blocked_attention.rows_per_step(8, None)
    return x

  with jax.set_mesh(mesh):
    jax.jit(probe).trace(jax.ShapeDtypeStruct((), jnp.float32))
  assert seen == {"auto": ("splash", "blocked"), "rows": 8}
  assert attention.resolve_impl("auto", 256) == "blocked"  # outside: this CPU


def test_attend_checks_shapes():
  q, k, v, _, seg = _inputs()
  with pytest.raises(ValueError, match="segment_ids"):
    attention.attend(q, k, v, seg[:, :10], impl="dense")
  with pytest.raises(ValueError, match="self-attention"):
    attention.attend(q, k[:, :10], v[:, :10], seg, impl="dense")


def test_benchmark_tiny_prints_every_figure(tmp_path, capsys):
  from egrc_jax.bench import attention as bench

  figs = bench.main(["--tiny", "--reps", "1", "--skip-model", "--out", str(tmp_path / "a.json")])
  assert set(figs["attention"]) == {"dense", "blocked", "jax.nn.dot_product_attention"}
  for f in figs["attention"].values():
    assert f["max_abs_diff_out_real"] < TOL and f["max_abs_diff_grads"] < TOL
  assert "jax.nn.dot_product_attention" in capsys.readouterr().out
