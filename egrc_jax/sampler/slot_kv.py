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


# The prompt cache is replicated over the batch axes so that every slot's read of its
# prompt's rows is local; slots are split like batch rows.
PROMPT_K_NAMES = (None, "kv_heads", "head_dim", None)
PROMPT_V_NAMES = (None, "kv_heads", None, "head_dim")


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

  @classmethod
  def create(cls, prompt: KVCache, num_slots: int, completion_len: int) -> DenseSlotKV:
    P, K, H, Tp = prompt.k[0].shape
    S, dt = Tp + completion_len, prompt.k[0].dtype
    zeros = lambda shape, names: shard(jnp.zeros(shape, dt), names)
    return cls(
      prompt_k=tuple(shard(k, PROMPT_K_NAMES) for k in prompt.k),
      prompt_v=tuple(shard(v, PROMPT_V_NAMES) for v in prompt.v),
      prompt_valid_PT=prompt.valid_BS,
      k=tuple(zeros((num_slots, K, H, S), KVCache.K_NAMES) for _ in prompt.k),
      v=tuple(zeros((num_slots, K, S, H), KVCache.V_NAMES) for _ in prompt.v),
    )

  def refill(self, take_B, step: SlotStep) -> DenseSlotKV:
    """Copy the new prompt's rows into the slots in take_B (only on a step with a refill).
    Completion slots >= t_b are masked, so the previous pair's keys need no clearing."""
    B, Tp = take_B.shape[0], self.prompt_valid_PT.shape[1]

    def copy(kv: DenseSlotKV) -> DenseSlotKV:
      rows_B = jnp.where(take_B, jnp.arange(B), B)  # out of range: dropped
      put = lambda x, src, axis: (
        x.at[rows_B, :, :, :Tp] if axis == 3 else x.at[rows_B, :, :Tp, :]
      ).set(jnp.take(src, step.prompt_B, axis=0), mode="drop")
      k = tuple(put(x, p, 3) for x, p in zip(kv.k, kv.prompt_k, strict=True))
      v = tuple(put(x, p, 2) for x, p in zip(kv.v, kv.prompt_v, strict=True))
      return kv.replace(k=k, v=v)

    return jax.lax.cond(jnp.any(take_B), copy, lambda kv: kv, self)

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
        jnp.take(self.prompt_valid_PT, step.prompt_B, axis=0),
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

  @classmethod
  def create(cls, prompt: KVCache, num_slots: int, completion_len: int) -> SplitSlotKV:
    P, K, H, Tp = prompt.k[0].shape
    dt = prompt.k[0].dtype
    zeros = lambda shape, names: shard(jnp.zeros(shape, dt), names)
    return cls(
      prompt_k=tuple(shard(k, PROMPT_K_NAMES) for k in prompt.k),
      prompt_v=tuple(shard(v, PROMPT_V_NAMES) for v in prompt.v),
      prompt_valid_PT=prompt.valid_BS,
      k=tuple(zeros((num_slots, K, H, completion_len), KVCache.K_NAMES) for _ in prompt.k),
      v=tuple(zeros((num_slots, K, completion_len, H), KVCache.V_NAMES) for _ in prompt.v),
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
    kp = jnp.take(self.prompt_k[layer], step.prompt_B, axis=0)
    vp = jnp.take(self.prompt_v[layer], step.prompt_B, axis=0)
    validp_BT = jnp.take(self.prompt_valid_PT, step.prompt_B, axis=0)
    validc_BC = jnp.arange(C)[None, :] < step.t_B[:, None]
    out = two_part_attention(q_B1NH[:, 0], kp, vp, validp_BT, kc, vc, validc_BC)
    return out_proj(attn, out), self.replace(k=_set(self.k, layer, kc), v=_set(self.v, layer, vc))
