"""Blocked (FlashAttention-style) self-attention in plain JAX, for CPU and GPU.

Shape letters: B rows, T slots (Tp: padded to a multiple of the blocks), N query heads, K kv
heads, G = N // K, H head dim, M = G * bq rows of a query block's score tile (a kv head's G
query heads stacked: GQA without repeating K/V), bq / bk query-block / key-block slots.

Forward, per query block i (online softmax over key blocks j, float32 state):
    s_j = q_i k_j^T (q pre-scaled by 1/sqrt(H)), masked to NEG_INF where not allowed
    m' = max(m, rowmax s_j);  l' = e^(m - m') l + rowsum e^(s_j - m')
    acc' = e^(m - m') acc + e^(s_j - m') v_j;   out_i = acc / l,  lse_i = m + log l
Backward (custom VJP; FlashAttention-2), recomputing each tile from the saved lse:
    p = e^(s - lse);  dv_j += p^T do_i;  ds = p (do_i v_j^T - rowsum(do_i * out_i))
    dq_i += ds k_j;  dk_j += ds^T q_i
Neither pass holds more than one [rows, K, M, bk] tile of scores.

Skipping: causal pairs above the diagonal are never visited (the key loop of block i stops
at its last slot), and a visited pair runs under `lax.cond` only if some row of the step has
a query and a key whose non-zero segment-id ranges overlap (per-block min/max): pad blocks
and the other sequences of a packed row cost nothing. `block_b` rows go through the pair
loops together (`lax.map` over row chunks): 1 row skips per row and keeps tiles in cache.

A query that sees no key gets output 0 and lse = +2.4e38, so its p and gradients are 0.
Loops (`fori_loop`), not unrolled blocks, keep compile time independent of T.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from egrc_jax.model.logical import logical_to_spec, shard

NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # the masked score (as splash's default)
_EMPTY_LSE = -NEG_INF  # lse of a query that sees no key: every exp(s - lse) becomes 0
# Default block: about 64 slots, evened out so that ceil(T / 64) blocks cover T with the
# least padding (T = 224: 4 blocks of 56, the fastest at the toy learner shapes on CPU, see
# egrc_jax.bench.attention).
BLOCK_TARGET = 64


def balanced_block(T: int, target: int = BLOCK_TARGET) -> int:
  """ceil(T / ceil(T / target)): blocks of about `target` slots that tile T evenly."""
  return -(-T // -(-T // target))


def trace_platform() -> str:
  """The platform being compiled for: the current mesh's devices when a mesh is set (an
  ahead-of-time compile for a TPU topology from a CPU host is a TPU program), else
  `jax.default_backend()`."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def _dslice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _seg_range(seg_BX):
  """Per row: (min, max) of the non-zero segment ids; (int32 max, 0) when all are pads."""
  lo = jnp.min(jnp.where(seg_BX != 0, seg_BX, jnp.iinfo(jnp.int32).max), axis=-1)
  return lo, jnp.max(seg_BX, axis=-1)


def _active(seg_q_BX, seg_k_BX):
  """Scalar: some row's query and key segment-id ranges overlap (necessary for any allowed
  pair; the tile is skipped otherwise)."""
  (qlo, qhi), (klo, khi) = _seg_range(seg_q_BX), _seg_range(seg_k_BX)
  return jnp.any((qlo <= khi) & (klo <= qhi))


def _tile_mask(seg_q_BX, seg_k_BX, q0, s0, G: int, causal: bool):
  """[B, 1, M, bk] bool: query row (t, g) of the block at slot q0 sees key s0 + s."""
  sq_BM = jnp.repeat(seg_q_BX, G, axis=1)
  ok = (sq_BM[:, :, None] == seg_k_BX[:, None, :]) & (sq_BM != 0)[:, :, None]
  if causal:
    t_M = q0 + jnp.arange(sq_BM.shape[1]) // G
    ok = ok & (s0 + jnp.arange(seg_k_BX.shape[1]) <= t_M[:, None])[None]
  return ok[:, None]


def _num_kv_blocks(i, bq: int, bk: int, nk: int, causal: bool):
  """Key blocks query block i visits: up to its last slot when causal, all otherwise."""
  return jnp.minimum(((i + 1) * bq + bk - 1) // bk, nk) if causal else nk


def _forward(q, k, v, seg, causal: bool, bq: int, bk: int):
  """q [B, K, Tp*G, H] pre-scaled, rows (t, g); k, v [B, K, Tp, H]; seg [B, Tp]. Returns
  (out like q, lse [B, K, Tp*G, 1] float32)."""
  B, K, TG, H = q.shape
  T = k.shape[2]
  G, M, nk = TG // T, bq * (TG // T), T // bk

  def q_block(i, carry):
    out, lse = carry
    q_i, seg_q = _dslice(q, i * M, M, 2), _dslice(seg, i * bq, bq, 1)

    def kv_block(j, state):
      def tile(state):
        m, l, acc = state
        k_j, v_j = _dslice(k, j * bk, bk, 2), _dslice(v, j * bk, bk, 2)
        s = jnp.einsum("bkmh,bksh->bkms", q_i, k_j, preferred_element_type=jnp.float32)
        ok = _tile_mask(seg_q, _dslice(seg, j * bk, bk, 1), i * bq, j * bk, G, causal)
        s = jnp.where(ok, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)  # a row masked so far (m = NEG_INF) is reset by alpha later
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum(
          "bkms,bksh->bkmh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32
        )
        return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv

      active = _active(seg_q, _dslice(seg, j * bk, bk, 1))
      return jax.lax.cond(active, tile, lambda st: st, state)

    m = jnp.full((B, K, M, 1), NEG_INF, jnp.float32)
    init = (m, jnp.zeros_like(m), jnp.zeros((B, K, M, H), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _num_kv_blocks(i, bq, bk, nk, causal), kv_block, init)
    sees_any = m > 0.5 * NEG_INF  # any real score is far above half the mask value
    l = jnp.where(sees_any, l, 1.0)
    out_i = jnp.where(sees_any, acc / l, 0.0).astype(q.dtype)
    lse_i = jnp.where(sees_any, m + jnp.log(l), _EMPTY_LSE)
    out = jax.lax.dynamic_update_slice_in_dim(out, out_i, i * M, axis=2)
    return out, jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * M, axis=2)

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((B, K, TG, 1), jnp.float32))
  return jax.lax.fori_loop(0, T // bq, q_block, init)


def _backward(q, k, v, seg, out, lse, do, causal: bool, bq: int, bk: int):
  """(dq, dk, dv) float32 over the same tiles (module docstring)."""
  B, K, TG, H = q.shape
  T = k.shape[2]
  G, M, nk = TG // T, bq * (TG // T), T // bk
  f32 = jnp.float32
  d_all = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1, keepdims=True)

  def q_block(i, carry):
    dq, dk, dv = carry
    q_i, do_i, lse_i, d_i = (_dslice(x, i * M, M, 2) for x in (q, do, lse, d_all))
    seg_q = _dslice(seg, i * bq, bq, 1)

    def kv_block(j, carry):
      dq_i, dk, dv = carry
      k_j, v_j = _dslice(k, j * bk, bk, 2), _dslice(v, j * bk, bk, 2)
      seg_k = _dslice(seg, j * bk, bk, 1)

      def tile(dq_i):
        s = jnp.einsum("bkmh,bksh->bkms", q_i, k_j, preferred_element_type=f32)
        ok = _tile_mask(seg_q, seg_k, i * bq, j * bk, G, causal)
        p = jnp.exp(jnp.where(ok, s, NEG_INF) - lse_i)
        dv_j = jnp.einsum("bkms,bkmh->bksh", p.astype(do.dtype), do_i, preferred_element_type=f32)
        dp = jnp.einsum("bkmh,bksh->bkms", do_i, v_j, preferred_element_type=f32)
        ds = p * (dp - d_i)
        dq_i = dq_i + jnp.einsum(
          "bkms,bksh->bkmh", ds.astype(k.dtype), k_j, preferred_element_type=f32
        )
        dk_j = jnp.einsum("bkms,bkmh->bksh", ds.astype(q.dtype), q_i, preferred_element_type=f32)
        return dq_i, dk_j, dv_j

      skip = lambda dq_i: (dq_i, jnp.zeros((B, K, bk, H), f32), jnp.zeros((B, K, bk, H), f32))
      dq_i, dk_j, dv_j = jax.lax.cond(_active(seg_q, seg_k), tile, skip, dq_i)
      # The full dk / dv stay out of the cond (no copies); one key block is added to.
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
        acc, _dslice(acc, j * bk, bk, 2) + x, j * bk, axis=2
      )
      return dq_i, add(dk, dk_j), add(dv, dv_j)

    n_kv = _num_kv_blocks(i, bq, bk, nk, causal)
    dq_i, dk, dv = jax.lax.fori_loop(0, n_kv, kv_block, (jnp.zeros(q_i.shape, f32), dk, dv))
    return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * M, axis=2), dk, dv

  init = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  return jax.lax.fori_loop(0, T // bq, q_block, init)


def _row_chunks(x, bb: int):
  """[B, ...] -> [B / bb, bb, ...]: chunk c holds rows c, c + B/bb, ... (strided, so that a
  batch sharded in contiguous blocks gives every device its share of every chunk)."""
  nc = x.shape[0] // bb
  return shard(x.reshape(bb, nc, *x.shape[1:]).swapaxes(0, 1), (None, "batch"))


def _over_rows(fn, bb: int, *xs):
  """fn over chunks of bb rows (lax.map); a direct call when bb is the whole batch."""
  if bb == xs[0].shape[0]:
    return fn(*xs)
  unchunk = lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:])
  return jax.tree.map(unchunk, jax.lax.map(lambda a: fn(*a), [_row_chunks(x, bb) for x in xs]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _core(q, k, v, seg, causal, bq, bk, bb):
  return _core_fwd(q, k, v, seg, causal, bq, bk, bb)[0]


def _core_fwd(q, k, v, seg, causal, bq, bk, bb):
  out, lse = _over_rows(lambda *a: _forward(*a, causal, bq, bk), bb, q, k, v, seg)
  return out, (q, k, v, seg, out, lse)


def _core_bwd(causal, bq, bk, bb, res, do):
  q, k, v, seg, out, lse = res
  bwd = lambda *a: _backward(*a, causal, bq, bk)
  dq, dk, dv = _over_rows(bwd, bb, q, k, v, seg, out, lse, do)
  seg_ct = np.zeros(seg.shape, jax.dtypes.float0)  # integer input: no cotangent
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), seg_ct


_core.defvjp(_core_fwd, _core_bwd)


def rows_per_step(B: int, block_b: int | None) -> int:
  """Rows per step: block_b (None: 1 on CPU, where one row's tiles stay in cache and its
  pads are skipped; the whole batch on GPU/TPU), rounded up to a multiple of the batch's
  shard count under a mesh (each step then spans every device) and to a divisor of B."""
  if block_b is not None and block_b < 1:
    raise ValueError(f"block_b={block_b} must be a positive number of rows (or None)")
  bb = block_b or (1 if trace_platform() == "cpu" else B)
  shards, mesh = 1, jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    axis = logical_to_spec(("batch",), (B,), mesh)[0]
    for a in () if axis is None else (axis,) if isinstance(axis, str) else axis:
      shards *= mesh.shape[a]
  bb = min(B, -(-bb // shards) * shards)
  while B % bb:
    bb += shards
  return bb


def blocked(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  segment_ids_BT,
  *,
  causal: bool = True,
  block_q: int | None = None,
  block_kv: int | None = None,
  block_b: int | None = None,
):
  """Online-softmax self-attention (module docstring) for any T. Blocks: None gives
  `balanced_block(T)`; blocks larger than T shrink to T, and T is padded (segment id 0)
  to a multiple of both block sizes. block_b: see `rows_per_step`."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  bq = balanced_block(T) if block_q is None else min(block_q, T)
  bk = balanced_block(T) if block_kv is None else min(block_kv, T)
  if bq < 1 or bk < 1:
    raise ValueError(f"block_q={block_q} and block_kv={block_kv} must be positive slot counts")
  Tp = -(-T // math.lcm(bq, bk)) * math.lcm(bq, bk)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
  q_scaled = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype)
  # [B, K, Tp*G, H] with rows (t, g): a kv head's G query heads share each score matmul.
  q_BKMH = pad(q_scaled).reshape(B, Tp, K, N // K, H).transpose(0, 2, 1, 3, 4)
  q_BKMH = q_BKMH.reshape(B, K, Tp * (N // K), H)
  k_BKSH, v_BKSH = (pad(x).transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))
  seg = pad(segment_ids_BT.astype(jnp.int32))
  out = _core(q_BKMH, k_BKSH, v_BKSH, seg, causal, bq, bk, rows_per_step(B, block_b))
  out = out.reshape(B, K, Tp, N // K, H).transpose(0, 2, 1, 3, 4)
  return out.reshape(B, Tp, N, H)[:, :T]
