"""KV layouts of the continuous decode loop: one prompt cache read by the G samples of a
group, plus each slot's own completion keys and values.

Shape letters: B slots, P prompts, Tp padded prompt length, C completion budget, N query
heads, K kv heads, G = N // K query heads per kv head, H head dim, L layers. Paged layout:
Pg tokens per page, Q pages in a shard's pool, R pages in a slot's table, W own pages per
slot, D batch shards (data x fsdp; 1 without a mesh).

Both layouts answer one question per decode step and slot b: the attention of the slot's
query over the real tokens of its prompt p_b followed by its own completion tokens
0 .. t_b - 1, after writing the newest key/value (token t_b - 1) first.

* `DenseSlotKV` (CPU, any backend): the prompt cache [P, K, H, Tp] as prefilled (left
  padded) and a completion cache [B, K, H, C]. The two parts are attended separately and
  merged through their shared max and normaliser (`two_part_attention`, a two-block online
  softmax). The completion part reads all C slots masked, which XLA's CPU dot does in place.
* `PagedSlotKV` (TPU): one page pool per layer and shard, [K, Q, Pg, H], holding every
  prompt's pages once and each slot's own pages. A slot's page table lists its prompt's
  full pages, then its own pages; the prompt's last, partial page is copied into the slot's
  first own page when the slot is refilled (copy on write), so a slot's keys are one
  contiguous sequence of len_p + t tokens and one paged-attention call reads only the
  filled pages (Pallas `paged_attention` on TPU; `paged_reference` elsewhere, for tests).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as Ps

from egrc_jax.model import KVCache
from egrc_jax.model.logical import logical_to_spec, shard

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # the model's mask value


def _set(xs: tuple, i: int, x) -> tuple:
  return xs[:i] + (x,) + xs[i + 1 :]


def two_part_attention(q_BNH, kp_BKHT, vp_BKTH, validp_BT, kc_BKHC, vc_BKCH, validc_BC):
  """One query per row over two key sets, as one softmax over their union.

  With l = q.k / sqrt(H) on each part (-inf where invalid), m = max over both parts and
  z = sum_p e^(l_p - m) + sum_c e^(l_c - m): out = sum_p (e^(l_p - m) / z) v_p +
  sum_c (e^(l_c - m) / z) v_c. The weights are normalised before the value products, as in
  the lock-step `softmax`, so both loops round the same way up to the order of the sums.
  """
  B, N, H = q_BNH.shape
  K = kp_BKHT.shape[1]
  q_BKGH = q_BNH.reshape(B, K, N // K, H)
  dot = lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
  lp_BKGT = dot("bkgh,bkht->bkgt", q_BKGH, kp_BKHT)
  lc_BKGC = dot("bkgh,bkhc->bkgc", q_BKGH, kc_BKHC)
  lp_BKGT = jnp.where(validp_BT[:, None, None], lp_BKGT * (H**-0.5), _NEG_INF)
  lc_BKGC = jnp.where(validc_BC[:, None, None], lc_BKGC * (H**-0.5), _NEG_INF)
  m_BKG1 = jnp.maximum(jnp.max(lp_BKGT, -1), jnp.max(lc_BKGC, -1))[..., None]
  ep_BKGT = jnp.exp(lp_BKGT - m_BKG1)
  ec_BKGC = jnp.exp(lc_BKGC - m_BKG1)
  z_BKG1 = jnp.sum(ep_BKGT, -1, keepdims=True) + jnp.sum(ec_BKGC, -1, keepdims=True)
  out_BKGH = dot("bkgt,bkth->bkgh", (ep_BKGT / z_BKG1).astype(vp_BKTH.dtype), vp_BKTH)
  out_BKGH = out_BKGH + dot("bkgc,bkch->bkgh", (ec_BKGC / z_BKG1).astype(vc_BKCH.dtype), vc_BKCH)
  return out_BKGH.reshape(B, N, H).astype(q_BNH.dtype)


@flax.struct.dataclass
class SlotStep:
  """Where each slot is: its prompt p_b, the step t_b >= 1 of the token it draws next
  (it feeds token t_b - 1), its prompt's real length, and whether it holds a pair."""

  prompt_B: jax.Array
  t_B: jax.Array
  prompt_len_B: jax.Array
  active_B: jax.Array


@flax.struct.dataclass
class DenseSlotKV:
  """prompt_k: L x [P, K, H, Tp]; prompt_v: L x [P, K, Tp, H]; prompt_valid_PT [P, Tp]
  (left padded, as prefilled); k: L x [B, K, H, C]; v: L x [B, K, C, H]."""

  prompt_k: tuple[jax.Array, ...]
  prompt_v: tuple[jax.Array, ...]
  prompt_valid_PT: jax.Array
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  # The prompt cache is replicated over the batch axes so that every slot's gather of its
  # prompt's rows is local; the slots are split like batch rows.
  PROMPT_K_NAMES = (None, "kv_heads", "head_dim", None)
  PROMPT_V_NAMES = (None, "kv_heads", None, "head_dim")

  @classmethod
  def create(cls, prompt: KVCache, num_slots: int, completion_len: int) -> DenseSlotKV:
    P, K, H, Tp = prompt.k[0].shape
    dt = prompt.k[0].dtype
    zeros = lambda shape, names: shard(jnp.zeros(shape, dt), names)
    return cls(
      prompt_k=tuple(shard(k, cls.PROMPT_K_NAMES) for k in prompt.k),
      prompt_v=tuple(shard(v, cls.PROMPT_V_NAMES) for v in prompt.v),
      prompt_valid_PT=prompt.valid_BS,
      k=tuple(zeros((num_slots, K, H, completion_len), KVCache.K_NAMES) for _ in prompt.k),
      v=tuple(zeros((num_slots, K, completion_len, H), KVCache.V_NAMES) for _ in prompt.v),
    )

  def refill(self, take_B, step: SlotStep) -> DenseSlotKV:
    """Nothing to do: a slot attends to completion slots < t_b only, all written by the
    pair it now holds."""
    return self

  def take(self, gather) -> DenseSlotKV:
    """The layout over fewer slots: gather([B, ...]) -> [B', ...] on each completion cache."""
    return self.replace(k=tuple(map(gather, self.k)), v=tuple(map(gather, self.v)))

  def attend(self, layer: int, q_BNH, k_BKH, v_BKH, step: SlotStep):
    """Write token t_b - 1's key/value at completion slot t_b - 1, then attend. Returns
    (out [B, N, H], the updated layout)."""
    kc, vc = self.k[layer], self.v[layer]
    B, C = kc.shape[0], kc.shape[-1]
    rows_B, col_B = jnp.arange(B), step.t_B - 1
    kc = kc.at[rows_B, :, :, col_B].set(k_BKH.astype(kc.dtype), unique_indices=True)
    vc = vc.at[rows_B, :, col_B, :].set(v_BKH.astype(vc.dtype), unique_indices=True)
    kp = jnp.take(self.prompt_k[layer], step.prompt_B, axis=0)
    vp = jnp.take(self.prompt_v[layer], step.prompt_B, axis=0)
    validp_BT = jnp.take(self.prompt_valid_PT, step.prompt_B, axis=0)
    validc_BC = jnp.arange(C)[None, :] < step.t_B[:, None]
    out = two_part_attention(q_BNH, kp, vp, validp_BT, kc, vc, validc_BC)
    return out, self.replace(k=_set(self.k, layer, kc), v=_set(self.v, layer, vc))

  def nbytes(self) -> dict[str, int]:
    size = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
    return {
      "prompt": size(self.prompt_k + self.prompt_v),
      "completion": size(self.k + self.v),
    }


def _batch_shards() -> int:
  """D: how many ways the current mesh splits batch rows (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def paged_reference(q_BNH, k_KQPH, v_KQPH, lengths_B, table_BR):
  """What the TPU paged-attention kernel computes, in plain jnp (gathers every page of
  every table: for tests and non-TPU backends). q is pre-scaled; keys s < length count."""
  B, N, H = q_BNH.shape
  K, _, Pg, _ = k_KQPH.shape
  R = table_BR.shape[1]
  gather = lambda x: jnp.take(x, table_BR, axis=1).reshape(K, B, R * Pg, H).transpose(1, 0, 2, 3)
  k_BKSH, v_BKSH = gather(k_KQPH), gather(v_KQPH)
  q_BKGH = q_BNH.reshape(B, K, N // K, H)
  logits = jnp.einsum("bkgh,bksh->bkgs", q_BKGH, k_BKSH, preferred_element_type=jnp.float32)
  valid_BS = jnp.arange(R * Pg)[None, :] < lengths_B[:, None]
  logits = jnp.where(valid_BS[:, None, None], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BKSH.dtype)
  out = jnp.einsum("bkgs,bksh->bkgh", probs, v_BKSH, preferred_element_type=jnp.float32)
  return out.reshape(B, N, H).astype(q_BNH.dtype)


def _pallas_paged(q_BNH, k_KQPH, v_KQPH, lengths_B, table_BR):
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

  R, Pg = table_BR.shape[1], k_KQPH.shape[2]
  # Pages per compute block: the largest divisor of R whose block holds <= 512 tokens.
  block = max(d for d in range(1, R + 1) if R % d == 0 and d * Pg <= max(512, Pg))
  return paged_attention(
    q_BNH, k_KQPH, v_KQPH, lengths_B, table_BR, pages_per_compute_block=block
  ).astype(q_BNH.dtype)


@flax.struct.dataclass
class PagedSlotKV:
  """k_pages / v_pages: L x [K, D * Q, Pg, H], shard d's pool at [d * Q, (d + 1) * Q);
  table_BR: int32 page ids local to the slot's shard. A shard's pool holds the P prompts'
  pages (n_p = ceil(Tp / Pg) each, prompt tokens right-aligned to page 0, i.e. un-padded)
  then W = ceil((Pg - 1 + C) / Pg) own pages for each of its B / D slots."""

  k_pages: tuple[jax.Array, ...]
  v_pages: tuple[jax.Array, ...]
  table_BR: jax.Array
  prompt_pages: int = flax.struct.field(pytree_node=False)
  own_pages: int = flax.struct.field(pytree_node=False)
  num_prompts: int = flax.struct.field(pytree_node=False)
  use_kernel: bool = flax.struct.field(pytree_node=False)

  POOL_NAMES = ("kv_heads", "batch", None, "head_dim")

  @classmethod
  def create(
    cls,
    prompt: KVCache,
    prompt_len_P,
    num_slots: int,
    completion_len: int,
    page_size: int,
    use_kernel: bool,
  ) -> PagedSlotKV:
    P, K, H, Tp = prompt.k[0].shape
    Pg, D = page_size, _batch_shards()
    if num_slots % D:
      raise ValueError(
        f"num_slots={num_slots} must be a multiple of the mesh's data x fsdp size {D} for "
        "the paged KV layout (each shard owns whole slots); round num_slots up"
      )
    n_p = -(-Tp // Pg)
    W = -(-(Pg - 1 + completion_len) // Pg)
    own = (num_slots // D) * W

    def pool(x_PKTH):
      # Left padding -> right: prompt p's real tokens move to slots [0, len_p).
      shift_P = Tp - prompt_len_P
      idx_PT = (jnp.arange(Tp)[None, :] + shift_P[:, None]) % Tp
      x_PKTH = jnp.take_along_axis(x_PKTH, idx_PT[:, None, :, None], axis=2)
      x_PKTH = jnp.pad(x_PKTH, ((0, 0), (0, 0), (0, n_p * Pg - Tp), (0, 0)))
      pages_KQPH = x_PKTH.reshape(P, K, n_p, Pg, H).transpose(1, 0, 2, 3, 4)
      pages_KQPH = pages_KQPH.reshape(K, P * n_p, Pg, H)
      shard_KQPH = jnp.concatenate([pages_KQPH, jnp.zeros((K, own, Pg, H), x_PKTH.dtype)], 1)
      return shard(jnp.tile(shard_KQPH, (1, D, 1, 1)), cls.POOL_NAMES)

    return cls(
      k_pages=tuple(pool(k.transpose(0, 1, 3, 2)) for k in prompt.k),
      v_pages=tuple(pool(v) for v in prompt.v),
      table_BR=jnp.zeros((num_slots, n_p + W), jnp.int32),
      prompt_pages=n_p,
      own_pages=W,
      num_prompts=P,
      use_kernel=use_kernel,
    )

  @property
  def page_size(self) -> int:
    return self.k_pages[0].shape[2]

  def _first_own_page(self, B: int):
    """[B] local id of each slot's first own page."""
    local_B = jnp.arange(B) % (B // _batch_shards())
    return self.num_prompts * self.prompt_pages + local_B * self.own_pages

  def refill(self, take_B, step: SlotStep) -> PagedSlotKV:
    """New tables for the slots in take_B, and their prompt's partial last page copied
    into their first own page."""
    B, R = self.table_BR.shape
    Pg, n_p = self.page_size, self.prompt_pages
    full_B = step.prompt_len_B // Pg  # f: the prompt's full pages
    own0_B = self._first_own_page(B)
    j_R = jnp.arange(R)
    rows_BR = jnp.where(
      j_R[None] < full_B[:, None],
      step.prompt_B[:, None] * n_p + j_R[None],
      jnp.where(j_R[None] < (full_B + self.own_pages)[:, None], own0_B[:, None] + j_R - full_B[:, None], 0),
    )
    table_BR = jnp.where(take_B[:, None], rows_BR, self.table_BR)
    src_B = step.prompt_B * n_p + jnp.minimum(full_B, n_p - 1)
    Q = self.k_pages[0].shape[1] // _batch_shards()
    dst_B = jnp.where(take_B, own0_B, Q)  # out of range: dropped

    def copy(pages_KQPH, src_B, dst_B):
      return pages_KQPH.at[:, dst_B].set(jnp.take(pages_KQPH, src_B, axis=1), mode="drop")

    k_pages = tuple(self._local(copy, (p, src_B, dst_B), 1) for p in self.k_pages)
    v_pages = tuple(self._local(copy, (p, src_B, dst_B), 1) for p in self.v_pages)
    return self.replace(k_pages=k_pages, v_pages=v_pages, table_BR=table_BR)

  def take(self, gather) -> PagedSlotKV:
    """The layout over fewer slots (the drain, nothing pending): the tables move, the pages
    stay where they are (no later refill reuses their own-page ids)."""
    return self.replace(table_BR=gather(self.table_BR))

  def attend(self, layer: int, q_BNH, k_BKH, v_BKH, step: SlotStep):
    """Write token t_b - 1 at logical position len_p + t_b - 1, then attend over the
    len_p + t_b filled positions. Returns (out [B, N, H], the updated layout)."""
    Pg = self.page_size
    pos_B = step.prompt_len_B + step.t_B - 1
    page_B = jnp.take_along_axis(self.table_BR, (pos_B // Pg)[:, None], 1)[:, 0]
    # An idle slot's table may still point at prompt pages: its write is dropped.
    page_B = jnp.where(step.active_B, page_B, self.k_pages[0].shape[1] // _batch_shards())
    off_B = pos_B % Pg
    lengths_B = jnp.where(step.active_B, pos_B + 1, 0).astype(jnp.int32)
    H = q_BNH.shape[-1]
    q_BNH = (q_BNH.astype(jnp.float32) * H**-0.5).astype(q_BNH.dtype)
    attention = _pallas_paged if self.use_kernel else paged_reference

    def local(kp, vp, q_BNH, k_BKH, v_BKH, page_B, off_B, lengths_B, table_BR):
      put = lambda x, new: x.at[:, page_B, off_B].set(
        new.astype(x.dtype).transpose(1, 0, 2), mode="drop"
      )
      kp, vp = put(kp, k_BKH), put(vp, v_BKH)
      return attention(q_BNH, kp, vp, lengths_B, table_BR), kp, vp

    args = (self.k_pages[layer], self.v_pages[layer], q_BNH, k_BKH, v_BKH)
    out, kp, vp = self._local(local, (*args, page_B, off_B, lengths_B, self.table_BR), 3)
    return out, self.replace(k_pages=_set(self.k_pages, layer, kp), v_pages=_set(self.v_pages, layer, vp))

  def _local(self, fn, args, num_out: int):
    """fn over each shard's own pool and slots (`shard_map` under a mesh: the Pallas kernel
    cannot be partitioned automatically, and page ids are local to a shard)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return fn(*args)
    pool = logical_to_spec(self.POOL_NAMES, self.k_pages[0].shape, mesh)
    heads = pool[0]  # kv heads over tensor when they divide it, else replicated

    def spec(x):
      if x.ndim == 4:
        return pool
      if x.ndim == 3:  # [B, N or K, H]: heads split like the pool's kv heads
        return Ps(pool[1], heads, None)
      return Ps(pool[1], *([None] * (x.ndim - 1)))

    in_specs = tuple(spec(a) for a in args)
    out_specs = (pool,) if num_out == 1 else (Ps(pool[1], heads, None), pool, pool)
    out = jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs[0] if num_out == 1 else out_specs,
                        check_vma=False)(*args)
    return out

  def nbytes(self) -> dict[str, int]:
    size = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
    total = size(self.k_pages + self.v_pages)
    pages = self.k_pages[0].shape[1]  # D * Q, of which D * P * n_p hold prompts
    prompt_pages = pages - self.table_BR.shape[0] * self.own_pages
    return {"prompt": total * prompt_pages // pages, "completion": total * (pages - prompt_pages) // pages}
