"""The paged KV layout of the continuous loop (TPU): one page pool per layer and batch
shard, holding every prompt's pages once and each slot's own pages.

Shape letters: B slots, P prompts, Tp padded prompt length, C completion budget, N query
heads, K kv heads, H head dim, L layers, Pg tokens per page, Q pages in a shard's pool, R
pages in a slot's table, W own pages per slot, D batch shards (data x fsdp; 1 without a
mesh).

A slot's page table lists its prompt's full pages, then its own pages. The prompt's last,
partial page is copied into the slot's first own page when the slot takes a pair (copy on
write), so a slot's keys form one contiguous sequence of len_p + t tokens and one
paged-attention call reads only the filled pages: the kernel's online softmax runs over
the shared prompt pages and the slot's own pages in turn. On TPU that call is the Pallas
kernel `jax.experimental.pallas.ops.tpu.paged_attention` (inside `shard_map`: a Mosaic
kernel cannot be partitioned automatically, and page ids are local to a shard); elsewhere
`paged_reference` computes the same in plain jnp (for tests; it gathers every page).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as Ps

from egrc_jax.model import KVCache
from egrc_jax.model.logical import logical_to_spec, shard
from egrc_jax.sampler.slot_kv import _NEG_INF, SlotStep, _set, out_proj


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
  table_BR: int32 page ids local to the slot's shard. A shard's pool holds its prompts'
  pages (n_p = ceil(Tp / Pg) each, prompt tokens moved to the start of page 0, i.e.
  un-padded): its own P / D prompts when each shard decodes its own prompts (shards = D),
  else all P; then W = ceil((Pg - 1 + C) / Pg) own pages for each of its B / D slots."""

  k_pages: tuple[jax.Array, ...]
  v_pages: tuple[jax.Array, ...]
  table_BR: jax.Array
  prompt_pages: int = flax.struct.field(pytree_node=False)
  own_pages: int = flax.struct.field(pytree_node=False)
  local_prompts: int = flax.struct.field(pytree_node=False)  # prompts in a shard's pool
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
    shards: int = 1,
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
    P_l = P // shards  # shards is D or 1 (`continuous.prompt_shards`)

    def pool(x_PKTH):
      # Left padding -> right: prompt p's real tokens move to slots [0, len_p).
      shift_P = Tp - prompt_len_P
      idx_PT = (jnp.arange(Tp)[None, :] + shift_P[:, None]) % Tp
      x_PKTH = jnp.take_along_axis(x_PKTH, idx_PT[:, None, :, None], axis=2)
      x_PKTH = jnp.pad(x_PKTH, ((0, 0), (0, 0), (0, n_p * Pg - Tp), (0, 0)))
      pages_KQPH = x_PKTH.reshape(P, K, n_p, Pg, H).transpose(1, 0, 2, 3, 4)
      pages_KDQPH = pages_KQPH.reshape(K, shards, P_l * n_p, Pg, H)
      if shards == 1:
        pages_KDQPH = jnp.tile(pages_KDQPH, (1, D, 1, 1, 1))  # every shard holds all prompts
      zeros = jnp.zeros((K, D, own, Pg, H), x_PKTH.dtype)
      pool_KDQPH = jnp.concatenate([pages_KDQPH, zeros], axis=2)
      return shard(pool_KDQPH.reshape(K, D * (P_l * n_p + own), Pg, H), cls.POOL_NAMES)

    return cls(
      k_pages=tuple(pool(k.transpose(0, 1, 3, 2)) for k in prompt.k),
      v_pages=tuple(pool(v) for v in prompt.v),
      table_BR=jnp.zeros((num_slots, n_p + W), jnp.int32),
      prompt_pages=n_p,
      own_pages=W,
      local_prompts=P_l,
      use_kernel=use_kernel,
    )

  @property
  def page_size(self) -> int:
    return self.k_pages[0].shape[2]

  def _first_own_page(self, B: int):
    """[B] local id of each slot's first own page."""
    local_B = jnp.arange(B) % (B // _batch_shards())
    return self.local_prompts * self.prompt_pages + local_B * self.own_pages

  def refill(self, take_B, step: SlotStep) -> PagedSlotKV:
    """New tables for the slots in take_B, and their prompt's partial last page copied
    into their first own page."""
    B, R = self.table_BR.shape
    Pg, n_p = self.page_size, self.prompt_pages
    full_B = step.prompt_len_B // Pg  # f: the prompt's full pages
    own0_B = self._first_own_page(B)
    j_R = jnp.arange(R)
    first_B = (step.prompt_B % self.local_prompts) * n_p  # the prompt's first page, locally
    rows_BR = jnp.where(
      j_R[None] < full_B[:, None],
      first_B[:, None] + j_R[None],
      jnp.where(
        j_R[None] < (full_B + self.own_pages)[:, None], own0_B[:, None] + j_R - full_B[:, None], 0
      ),
    )
    table_BR = jnp.where(take_B[:, None], rows_BR, self.table_BR)
    src_B = first_B + jnp.minimum(full_B, n_p - 1)
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

  def attend(self, layer: int, attn, q_B1NH, k_B1KH, v_B1KH, step: SlotStep):
    """Write token t_b - 1 at logical position len_p + t_b - 1, then attend over the
    len_p + t_b filled positions. Returns ([B, 1, D], the updated layout)."""
    q_BNH, k_BKH, v_BKH = q_B1NH[:, 0], k_B1KH[:, 0], v_B1KH[:, 0]
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
    new = self.replace(k_pages=_set(self.k_pages, layer, kp), v_pages=_set(self.v_pages, layer, vp))
    return out_proj(attn, out), new

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
    out = jax.shard_map(
      fn, in_specs=in_specs, out_specs=out_specs[0] if num_out == 1 else out_specs, check_vma=False
    )(*args)
    return out

  def nbytes(self) -> dict[str, int]:
    size = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
    total = size(self.k_pages + self.v_pages)
    pages = self.k_pages[0].shape[1]  # D * Q, of which D * P * n_p hold prompts
    prompt_pages = pages - self.table_BR.shape[0] * self.own_pages
    return {
      "prompt": total * prompt_pages // pages,
      "completion": total * (pages - prompt_pages) // pages,
    }
