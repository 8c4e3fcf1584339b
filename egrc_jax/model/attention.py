"""Self-attention over a row of slots: one signature, one function per implementation.

Shape letters: B rows, T query slots, S key slots (T == S: self-attention over the row), N
query heads, K kv heads, G = N // K query heads per kv head, H head dim, M = G * (slots of
a query block): the rows of one block's score tile.

    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, impl=..., causal=True)

The mask: query t sees key s iff seg[t] == seg[s] != 0 and (s <= t when causal), with
non-negative integer segment ids. Id 0 marks padding, so one rule covers left-padded rows
(0 0 1 1 1), right-padded rows (1 1 1 0 0) and packed rows (1 1 2 2 2 3 0). A query that
sees no key (a pad) gets output 0 and zero gradients, never NaN. Scores are
softmax(q.k / sqrt(H)) in float32 whatever the input dtype; GQA is computed per kv head
with its G query heads stacked as rows of one matmul, never by repeating K/V.

Implementations:
  * `dense`: the reference, the model's original attention: [B, K, G, T, S] float32
    scores, masked with a large negative, softmax; used by the tests (fine for short
    rows). Scores now accumulate in float32 (preferred_element_type): bitwise as before in
    float32 compute, more precise in bfloat16 (where its backward's score-gradient
    matmuls then take float32 x bfloat16 operands; blocked's stay bfloat16).
  * `blocked` (egrc_jax.model.blocked_attention): FlashAttention-style online softmax in
    plain JAX for CPU/GPU. Loops over query blocks x key blocks that never visit the causal
    upper triangle; each visited pair runs under `lax.cond` and is skipped when no row of
    the step has a query and a key with a common segment (per-block segment min/max), e.g.
    pad blocks or the other sequences of a packed row. Its custom VJP recomputes each
    tile's scores from the saved log-sum-exp: neither pass stores a [T, S] score matrix.
  * `splash`: the Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu.
    splash_attention) with a causal (or full) static mask and segment ids; in Pallas
    interpret mode off TPU (slow; for tests). Under a mesh it runs inside `shard_map`
    over the batch (and heads when both N and K divide the tensor axis).
  * `auto`: splash on TPU when T fits its blocks (a multiple of 128), blocked otherwise;
    decided at trace time by the platform of the current mesh's devices, or
    `jax.default_backend()` outside a mesh (`blocked_attention.trace_platform`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from egrc_jax.model.blocked_attention import NEG_INF, blocked, trace_platform
from egrc_jax.model.logical import logical_to_spec

IMPLS = ("auto", "dense", "blocked", "splash")
SPLASH_LANES = 128  # splash tiles keys (and, with segment ids, queries) in 128-lane units
SPLASH_BLOCK = 512


def allowed_mask(segment_ids_BT: jax.Array, causal: bool) -> jax.Array:
  """[B, T, T] bool: query t may attend to key s (see the module docstring)."""
  seg = segment_ids_BT
  ok = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    T = seg.shape[1]
    ok = ok & jnp.tril(jnp.ones((T, T), bool))[None]
  return ok


def _check(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
  B, T, N, H = q_BTNH.shape
  if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[::3] != (B, H) or k_BSKH.shape[1] != T:
    raise ValueError(
      f"self-attention needs k and v of shape [B={B}, S=T={T}, K, H={H}]; got k "
      f"{k_BSKH.shape}, v {v_BSKH.shape}"
    )
  if N % k_BSKH.shape[2]:
    raise ValueError(f"{N} query heads are not a multiple of {k_BSKH.shape[2]} kv heads")
  if segment_ids_BT.shape != (B, T):
    raise ValueError(f"segment_ids has shape {segment_ids_BT.shape}; expected {(B, T)}")


# -- dense ----------------------------------------------------------------------------------


def dense(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, causal: bool = True):
  """Reference attention: the whole [B, K, G, T, S] float32 score tensor."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits = logits * (H**-0.5)
  allowed_BTS = allowed_mask(segment_ids_BT, causal)
  logits = jnp.where(allowed_BTS[:, None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH).reshape(B, T, N, H)
  # A query that sees nothing got a uniform softmax over masked scores: give it 0.
  sees_any_BT = jnp.any(allowed_BTS, axis=-1)
  return jnp.where(sees_any_BT[:, :, None, None], out, 0).astype(q_BTNH.dtype)


# -- splash (Pallas, TPU) -------------------------------------------------------------------


def _default_block(T: int) -> int:
  for b in range(min(SPLASH_BLOCK, T) // SPLASH_LANES * SPLASH_LANES, 0, -SPLASH_LANES):
    if T % b == 0:
      return b
  return min(SPLASH_BLOCK, T)  # T under 128 or not a multiple of it: rejected below


def splash_blocks(T: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
  """Validated (block_q, block_kv) for splash at sequence length T; None = the largest
  multiple of 128 up to 512 that divides T (T = 1024 + 8192 prompt and budget: 512; a
  256-token prompt bucket + 8192: 256)."""
  bq = _default_block(T) if block_q is None else block_q
  bk = _default_block(T) if block_kv is None else block_kv
  for name, b in (("block_q", bq), ("block_kv", bk)):
    if b < 1 or b % SPLASH_LANES or T % b:
      raise ValueError(
        f"splash attention: {name}={b} must be a positive multiple of {SPLASH_LANES} that "
        f"divides the sequence length T={T}; pad rows to a multiple of {SPLASH_LANES} (e.g. "
        "the sampler's prompt buckets) or use attention_impl='blocked' (any T)"
      )
  return bq, bk


def _splash_kernel(N: int, T: int, causal: bool, bq: int, bk: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

  one = sa.CausalMask((T, T)) if causal else sa.FullMask((T, T))
  sizes = sa.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  # Built per call, inside the caller's trace: its block tables are constants of that
  # program (splash caches the numpy mask processing itself).
  kernel = sa.make_splash_mha(
    sa.MultiHeadMask((one,) * N),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
  return kernel, sa.SegmentIds


def _splash_local(q_BTNH, k_BSKH, v_BSKH, seg_BT, causal, bq, bk, interpret):
  B, T, N, H = q_BTNH.shape
  kernel, segment_ids = _splash_kernel(N, T, causal, bq, bk, interpret)
  # The kernel takes heads-major [N, T, H] per row and does not scale the scores.
  q_BNTH = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  seg = seg_BT.astype(jnp.int32)
  run = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s))
  out_BNTH = jax.vmap(run)(q_BNTH, k_BKSH, v_BKSH, seg)
  # Pads (id 0) attend to pads inside the kernel (no empty rows there): zero them here,
  # which also zeroes every gradient that would flow through them.
  return jnp.where((seg != 0)[:, :, None, None], out_BNTH.transpose(0, 2, 1, 3), 0)


def splash(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  segment_ids_BT,
  *,
  causal: bool = True,
  block_q: int | None = None,
  block_kv: int | None = None,
  interpret: bool | None = None,
):
  """The Pallas splash kernel (see the module docstring). interpret None: Pallas interpret
  mode unless running on TPU. The static mask's causal blocks are skipped by the kernel;
  segment ids are applied inside the blocks it visits."""
  B, T, N, H = q_BTNH.shape
  bq, bk = splash_blocks(T, block_q, block_kv)
  interpret = trace_platform() != "tpu" if interpret is None else interpret
  local = functools.partial(_splash_local, causal=causal, bq=bq, bk=bk, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  # A Pallas call is not partitioned by the compiler: run it per shard, batch over
  # data x fsdp, heads over tensor only when both N and K divide it (GQA stays aligned).
  q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q_BTNH.shape, mesh)
  k_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_BSKH.shape, mesh)
  heads = q_spec[2] if q_spec[2] == k_spec[2] else None
  spec = P(q_spec[0], None, heads, None)
  run = jax.shard_map(
    local, mesh=mesh, in_specs=(spec,) * 3 + (P(q_spec[0], None),), out_specs=spec, check_vma=False
  )
  return run(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


# -- the one entry point --------------------------------------------------------------------


def resolve_impl(impl: str, T: int, block_q: int | None = None, block_kv: int | None = None):
  """The implementation `attend` runs: `auto` is splash on TPU when T fits its blocks,
  blocked otherwise."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
  if impl != "auto":
    return impl
  if trace_platform() != "tpu":
    return "blocked"
  try:
    splash_blocks(T, block_q, block_kv)
  except ValueError:
    return "blocked"
  return "splash"


def attend(
  q_BTNH,
  k_BSKH,
  v_BSKH,
  segment_ids_BT,
  *,
  impl: str = "auto",
  causal: bool = True,
  block_q: int | None = None,
  block_kv: int | None = None,
  block_b: int | None = None,
):
  """Self-attention out_BTNH (dtype of q) with segment-id masking (module docstring).

  block_q / block_kv: query-block and key-chunk slots (None: the implementation's default);
  block_b: rows per step of blocked attention (None: 1 on CPU, the whole batch elsewhere).
  """
  _check(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  T = q_BTNH.shape[1]
  impl = resolve_impl(impl, T, block_q, block_kv)
  if impl == "dense":
    return dense(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal)
  if impl == "splash":
    return splash(
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, block_q=block_q, block_kv=block_kv
    )
  return blocked(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    segment_ids_BT,
    causal=causal,
    block_q=block_q,
    block_kv=block_kv,
    block_b=block_b,
  )
