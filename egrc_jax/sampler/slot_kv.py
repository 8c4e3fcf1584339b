"""KV layouts of the continuous decode loop: a prompt cache prefilled once per prompt, read
by the G samples of its group, plus what each slot holds for its own row.

Shape letters: B slots, P prompts, Tp padded prompt length, C completion budget, S = Tp + C,
D hidden, N query heads, K kv heads, G = N // K query heads per kv head, H head dim, L
layers.

Every layout answers one question per decode step and slot b, after writing the newest
key/value (token t_b - 1): the attention output (after the output projection, [B, 1, D])
of the slot's query over the real tokens of its prompt p_b followed by its own completion
tokens 0 .. t_b - 1.

* `DenseSlotKV` ("dense", the CPU default): each slot holds a lock-step row, [K, H, S]; its
  prompt's cache rows are copied in when the slot takes a pair (a step with no refill
  copies nothing). A step runs the model's own `Attention.attend_cache` on the same shapes
  and masks as the lock-step loop, so a row's logits are the lock-step's bit for bit
  wherever XLA computes a row the same way at both batch sizes.
* `SplitSlotKV` ("split"): each slot holds only its completion, [K, H, C]; the prompt part
  is read from the shared prompt cache (gathered by prompt index every step) and the two
  parts are merged by their shared max and normaliser (`two_part_attention`). The least
  memory of the dense layouts; logits equal the lock-step's up to the order of the sums.
* `PagedSlotKV` ("paged", TPU; `paged_kv.py`): one page pool holding each prompt once and
  each slot's own pages, read by the Pallas paged-attention kernel.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from egrc_jax.model import KVCache
from egrc_jax.model.logical import shard

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # the model's mask value


def _set(xs: tuple, i: int, x) -> tuple:
  return xs[:i] + (x,) + xs[i + 1 :]


@flax.struct.dataclass
class SlotStep:
  """Where each slot is: its prompt p_b, the step t_b >= 1 of the token it draws next
  (it feeds token t_b - 1), its prompt's real length, and whether it holds a pair."""

  prompt_B: jax.Array
  t_B: jax.Array
  prompt_len_B: jax.Array
  active_B: jax.Array


def out_proj(attn, out_BNH):
  """The lock-step T = 1 output projection (`Attention.attend_cache`): N*H contracted as
  one axis. Returns [B, 1, D]."""
  cfg = attn.cfg
  B, N, H = out_BNH.shape
  o_FD = attn.o_NHD[...].astype(cfg.jnp_dtype).reshape(N * H, cfg.hidden_size)
  out_BD = out_BNH.reshape(B, N * H) @ o_FD
  if cfg.o_bias:
    out_BD = out_BD + attn.o_bias_D[...].astype(cfg.jnp_dtype)
  return out_BD[:, None]


def prompt_names(shards: int) -> tuple[tuple, tuple]:
  """Logical names of the prompt cache's k and v: split over the batch axes like the slots
  when each shard decodes its own prompts (shards > 1), else replicated over them; either
  way every slot reads its prompt's rows locally."""
  if shards > 1:
    return KVCache.K_NAMES, KVCache.V_NAMES
  return (None, "kv_heads", "head_dim", None), (None, "kv_heads", None, "head_dim")


def take_prompt_rows(x_P, prompt_B, shards: int):
  """x_P[prompt_B] along axis 0. With shards > 1, prompts and slots are split alike and a
  slot's prompt is on its own shard: the gather runs per shard (a batched gather that the
  partitioner keeps local, where a flat one would gather the whole prompt cache)."""
  if shards == 1:
    return jnp.take(x_P, prompt_B, axis=0)
  P, B, rest = x_P.shape[0], prompt_B.shape[0], x_P.shape[1:]
  x_DP = x_P.reshape(shards, P // shards, *rest)
  idx = (prompt_B % (P // shards)).reshape(shards, B // shards, *([1] * len(rest)))
  return jnp.take_along_axis(x_DP, idx, axis=1).reshape(B, *rest)


@flax.struct.dataclass
class DenseSlotKV:
  """prompt_k: L x [P, K, H, Tp]; prompt_v: L x [P, K, Tp, H]; prompt_valid_PT [P, Tp]
  (left padded, as prefilled); k: L x [B, K, H, S]; v: L x [B, K, S, H]: slot b's row is
  its prompt's rows then its completion at Tp + t, as in a lock-step cache row."""

  prompt_k: tuple[jax.Array, ...]
  prompt_v: tuple[jax.Array, ...]
  prompt_valid_PT: jax.Array
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  shards: int = flax.struct.field(pytree_node=False, default=1)  # Dq (`take_prompt_rows`)

  @classmethod
  def create(cls, prompt: KVCache, num_slots: int, completion_len: int, shards: int = 1):
    P, K, H, Tp = prompt.k[0].shape
    S, dt = Tp + completion_len, prompt.k[0].dtype
    zeros = lambda shape, names: shard(jnp.zeros(shape, dt), names)
    k_names, v_names = prompt_names(shards)
    return cls(
      prompt_k=tuple(shard(k, k_names) for k in prompt.k),
      prompt_v=tuple(shard(v, v_names) for v in prompt.v),
      prompt_valid_PT=prompt.valid_BS,
      k=tuple(zeros((num_slots, K, H, S), KVCache.K_NAMES) for _ in prompt.k),
      v=tuple(zeros((num_slots, K, S, H), KVCache.V_NAMES) for _ in prompt.v),
      shards=shards,
    )

  def refill(self, take_B, step: SlotStep) -> DenseSlotKV:
    """Copy the new prompt's rows into the slots in take_B, one slot at a time in a loop
    of sum(take_B) trips: a step without a refill copies nothing (a `lax.cond` returning
    the cache would copy all of it on every step). Completion slots >= t_b are masked,
    so the previous pair's keys need no clearing."""
    B = take_B.shape[0]
    P_l = self.prompt_valid_PT.shape[0] // self.shards  # prompts per shard
    slots_B = jnp.nonzero(take_B, size=B, fill_value=0)[0]
    zero = jnp.zeros((), jnp.int32)

    def one(i, kv: DenseSlotKV) -> DenseSlotKV:
      b = slots_B[i]
      # The slot's prompt row; with shards > 1 it lives on the slot's own shard.
      p = (
        step.prompt_B[b]
        if kv.shards == 1
        else (b // (B // kv.shards)) * P_l + step.prompt_B[b] % P_l
      )
      row = lambda x: jax.lax.dynamic_slice_in_dim(x, p, 1, axis=0)
      put = lambda x, src: jax.lax.dynamic_update_slice(
        x, row(src).astype(x.dtype), (b, zero, zero, zero)
      )
      k = tuple(put(x, src) for x, src in zip(kv.k, kv.prompt_k, strict=True))
      v = tuple(put(x, src) for x, src in zip(kv.v, kv.prompt_v, strict=True))
      return kv.replace(k=k, v=v)

    return jax.lax.fori_loop(0, jnp.sum(take_B, dtype=jnp.int32), one, self)

  def take(self, gather) -> DenseSlotKV:
    """The layout over fewer slots: gather([B, ...]) -> [B', ...] on each slot row."""
    return self.replace(k=tuple(map(gather, self.k)), v=tuple(map(gather, self.v)))

  def attend(self, layer: int, attn, q_B1NH, k_B1KH, v_B1KH, step: SlotStep):
    """Write token t_b - 1 at slot Tp + t_b - 1, then the lock-step attention. Returns
    ([B, 1, D], the updated layout)."""
    kc, vc = self.k[layer], self.v[layer]
    B, S = kc.shape[0], kc.shape[-1]
    Tp = self.prompt_valid_PT.shape[1]
    rows_B, col_B = jnp.arange(B), Tp + step.t_B - 1
    kc = kc.at[rows_B, :, :, col_B].set(k_B1KH[:, 0].astype(kc.dtype), unique_indices=True)
    vc = vc.at[rows_B, :, col_B, :].set(v_B1KH[:, 0].astype(vc.dtype), unique_indices=True)
    # The lock-step mask: the prompt's real tokens and the completion written so far.
    valid_BS = jnp.concatenate(
      [
        take_prompt_rows(self.prompt_valid_PT, step.prompt_B, self.shards),
        jnp.arange(S - Tp) < step.t_B[:, None],
      ],
      axis=1,
    )
    out = attn.attend_cache(q_B1NH, kc, vc, valid_BS[:, None, :])
    return out, self.replace(k=_set(self.k, layer, kc), v=_set(self.v, layer, vc))


def two_part_attention(q_BNH, kp_BKHT, vp_BKTH, validp_BT, kc_BKHC, vc_BKCH, validc_BC):
  """One query per row over two key sets, as one softmax over their union.

  With l = q.k / sqrt(H) on each part (-inf where invalid), m = max over both parts and
  z = sum_p e^(l_p - m) + sum_c e^(l_c - m): out = sum_p (e^(l_p - m) / z) v_p +
  sum_c (e^(l_c - m) / z) v_c. The weights are normalised before the value products, as in
  the lock-step `softmax`, so both round alike up to the order of the sums.
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
class SplitSlotKV:
  """prompt_k / prompt_v / prompt_valid_PT as in `DenseSlotKV`; k: L x [B, K, H, C];
  v: L x [B, K, C, H]: slot b's completion only."""

  prompt_k: tuple[jax.Array, ...]
  prompt_v: tuple[jax.Array, ...]
  prompt_valid_PT: jax.Array
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  shards: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def create(cls, prompt: KVCache, num_slots: int, completion_len: int, shards: int = 1):
    P, K, H, Tp = prompt.k[0].shape
    dt = prompt.k[0].dtype
    zeros = lambda shape, names: shard(jnp.zeros(shape, dt), names)
    k_names, v_names = prompt_names(shards)
    return cls(
      prompt_k=tuple(shard(k, k_names) for k in prompt.k),
      prompt_v=tuple(shard(v, v_names) for v in prompt.v),
      prompt_valid_PT=prompt.valid_BS,
      k=tuple(zeros((num_slots, K, H, completion_len), KVCache.K_NAMES) for _ in prompt.k),
      v=tuple(zeros((num_slots, K, completion_len, H), KVCache.V_NAMES) for _ in prompt.v),
      shards=shards,
    )

  def refill(self, take_B, step: SlotStep) -> SplitSlotKV:
    """Nothing to copy: a slot reads completion slots < t_b only, all its own pair's."""
    return self

  def take(self, gather) -> SplitSlotKV:
    return self.replace(k=tuple(map(gather, self.k)), v=tuple(map(gather, self.v)))

  def attend(self, layer: int, attn, q_B1NH, k_B1KH, v_B1KH, step: SlotStep):
    """Write token t_b - 1 at completion slot t_b - 1, then attend over both parts."""
    kc, vc = self.k[layer], self.v[layer]
    B, C = kc.shape[0], kc.shape[-1]
    rows_B, col_B = jnp.arange(B), step.t_B - 1
    kc = kc.at[rows_B, :, :, col_B].set(k_B1KH[:, 0].astype(kc.dtype), unique_indices=True)
    vc = vc.at[rows_B, :, col_B, :].set(v_B1KH[:, 0].astype(vc.dtype), unique_indices=True)
    kp = take_prompt_rows(self.prompt_k[layer], step.prompt_B, self.shards)
    vp = take_prompt_rows(self.prompt_v[layer], step.prompt_B, self.shards)
    validp_BT = take_prompt_rows(self.prompt_valid_PT, step.prompt_B, self.shards)
    validc_BC = jnp.arange(C)[None, :] < step.t_B[:, None]
    out = two_part_attention(q_B1NH[:, 0], kp, vp, validp_BT, kc, vc, validc_BC)
    return out_proj(attn, out), self.replace(k=_set(self.k, layer, kc), v=_set(self.v, layer, vc))
