"""A Qwen2 / Llama / Qwen3-family decoder in Flax NNX.

Shape letters: B batch, T query length, S key length (cache slots), D hidden, F MLP width,
V vocab, N query heads, K key/value heads, G = N // K query heads per kv head, H head dim,
L layers.

Three paths share every weight:
  * `__call__(tokens_BT, positions_BT, mask_BT | segment_ids_BT=...)`: a full causal
    forward over padded or packed rows. Token t attends to slot s <= t of its own segment
    (`segment_ids_BT`: 0 on pads, 1, 2, ... for the sequences of a packed row, with
    positions restarting per sequence: `positions_from_segments`); `mask_BT` (True on real
    tokens) is segment ids 1/0. Attention is `cfg.attention_impl` (egrc_jax.model.attention).
  * `prefill(tokens_BT, positions_BT, mask_BT, cache)`: the prompt into an EMPTY cache:
    self-attention over the prompt as in `__call__` (no [T, S] scores with blocked or
    splash), then its keys/values written to slots [0, T).
  * `decode(tokens_BT, positions_BT, mask_BT, cache)`: writes the T new keys/values into the
    explicit `KVCache` pytree at `cache.index` and attends (dense) over every valid slot up
    to each query's own slot; a sampling step is T = 1.

Compute dtype: every parameter is cast to `cfg.dtype` where it is used and every matmul
takes `cfg.dtype` operands, whatever `cfg.param_dtype` is; norms and softmax work in float32
inside and return the compute dtype; logits are float32.

Every parameter carries logical axis names (`out_sharding` metadata) that `egrc_jax.sharding`
maps to mesh axes; activations get logical sharding constraints through `shard`.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from egrc_jax.model import attention
from egrc_jax.model.config import ModelConfig
from egrc_jax.model.logical import shard
from egrc_jax.model.rows import segment_ids

_NEG_INF = attention.NEG_INF


def _param(rngs: nnx.Rngs, shape, names, dtype, std: float | None = None):
  """A parameter with logical axis names; zeros when std is None, N(0, std) otherwise."""
  if std is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _ones_param(shape, names, dtype):
  return nnx.Param(jnp.ones(shape, dtype), out_sharding=names, eager_sharding=False)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, plus which slots hold real tokens.

  k: tuple of L arrays [B, K, H, S]; v: tuple of L arrays [B, K, S, H]. With (b, k) the two
  major axes of both, a decode step's q.k and p.v are batched matmuls that XLA's CPU dot
  reads in place (a v of [B, S, K, H] needed a transpose or a strided multiply-reduce: 4-5x
  slower). valid_BS: bool [B, S]; index: int32 scalar, the next slot to write (all rows
  write in lock step; left padding keeps rows aligned).
  """

  # Logical axis names of each k / v array (for sharding constraints).
  K_NAMES = ("batch", "kv_heads", "head_dim", "cache_length")
  V_NAMES = ("batch", "kv_heads", "cache_length", "head_dim")

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid_BS: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, size: int, dtype=None) -> KVCache:
    dtype = dtype or cfg.jnp_dtype
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, size)
    v_shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
    return cls(
      k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
      v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),
      valid_BS=jnp.zeros((batch, size), bool),
      index=jnp.zeros((), jnp.int32),
    )

  @property
  def size(self) -> int:
    return self.valid_BS.shape[1]

  def repeat(self, g: int) -> KVCache:
    """Each row copied g times, consecutively (row b -> rows b*g .. b*g+g-1)."""
    rep = lambda x: jnp.repeat(x, g, axis=0)
    return KVCache(
      k=tuple(map(rep, self.k)),
      v=tuple(map(rep, self.v)),
      valid_BS=rep(self.valid_BS),
      index=self.index,
    )

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

  def constrain(self) -> KVCache:
    """The same cache with logical sharding constraints (batch over data x fsdp, kv heads
    over tensor) under the current mesh; a no-op outside any mesh."""
    return self.replace(
      k=tuple(shard(k, self.K_NAMES) for k in self.k),
      v=tuple(shard(v, self.V_NAMES) for v in self.v),
    )


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2] in float32, with llama3 scaling when configured."""
  H = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  if cfg.rope_scaling_factor is None:
    return inv_freq
  factor = cfg.rope_scaling_factor
  lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_ctx = cfg.rope_original_max_position
  low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_ctx / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the rotate-half layout that HF checkpoints use."""
  freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  cos = jnp.cos(emb_BTH)[:, :, None, :].astype(x_BTNH.dtype)
  sin = jnp.sin(emb_BTH)[:, :, None, :].astype(x_BTNH.dtype)
  x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BTNH * cos + rotated * sin


class RMSNorm(nnx.Module):
  """y = scale * x / sqrt(mean(x^2) + eps): the statistic in float32, the result (and the
  scale multiply, as HF does it) in the compute dtype whatever the parameter dtype."""

  def __init__(self, dim: int, eps: float, param_dtype, dtype, names=("norm",)):
    self.scale = _ones_param((dim,), names, param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def dense(x_BTI: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, T, I] times w [I, *O] as one [B*T, I] x [I, prod O] matrix product -> [B, T, *O].

  The same contraction as einsum("bti,i...->bt..."), written as a 2D matmul: XLA's CPU
  backend ran the batched 3D form's backward about 2x slower (toy MLP shapes)."""
  B, T, I = x_BTI.shape
  out = x_BTI.reshape(B * T, I) @ w.reshape(I, -1)
  return out.reshape(B, T, *w.shape[1:])


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd, std = cfg.jnp_param_dtype, 0.02
    self.cfg = cfg
    self.q_DNH = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd, std)
    self.k_DKH = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, std)
    self.v_DKH = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, std)
    self.o_NHD = _param(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd, std)
    if cfg.qkv_bias:
      self.q_bias_NH = _param(rngs, (N, H), ("heads", "head_dim"), pd)
      self.k_bias_KH = _param(rngs, (K, H), ("kv_heads", "head_dim"), pd)
      self.v_bias_KH = _param(rngs, (K, H), ("kv_heads", "head_dim"), pd)
    if cfg.o_bias:
      self.o_bias_D = _param(rngs, (D,), ("norm",), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.rms_norm_eps, pd, cfg.jnp_dtype, ("head_dim",))
      self.k_norm = RMSNorm(H, cfg.rms_norm_eps, pd, cfg.jnp_dtype, ("head_dim",))

  def project(self, x_BTD, positions_BT, inv_freq):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    q = dense(x_BTD, self.q_DNH[...].astype(dt))
    k = dense(x_BTD, self.k_DKH[...].astype(dt))
    v = dense(x_BTD, self.v_DKH[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.q_bias_NH[...].astype(dt)
      k = k + self.k_bias_KH[...].astype(dt)
      v = v + self.v_bias_KH[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions_BT, inv_freq)
    k = apply_rope(k, positions_BT, inv_freq)
    q = shard(q, ("batch", "length", "heads", "head_dim"))
    k = shard(k, ("batch", "length", "kv_heads", "head_dim"))
    v = shard(v, ("batch", "length", "kv_heads", "head_dim"))
    return q, k, v

  def attend(self, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """Causal self-attention within segments (cfg.attention_impl), then the output
    projection: [B, T, D]."""
    cfg = self.cfg
    out_BTNH = attention.attend(
      q_BTNH,
      k_BSKH,
      v_BSKH,
      segment_ids_BT,
      impl=cfg.attention_impl,
      block_q=cfg.attention_block_q or None,
      block_kv=cfg.attention_block_kv or None,
      block_b=cfg.attention_block_b or None,
    )
    return self.out_proj(out_BTNH)

  def attend_cache(self, q_BTNH, k_BKHS, v_BKSH, allowed_BTS):
    """`attend` over the cache layout (keys [B, K, H, S], values [B, K, S, H]): both
    contractions are matmuls batched over (b, k), the two major axes of every operand."""
    cfg = self.cfg
    B, T, N, H = q_BTNH.shape
    K = cfg.num_kv_heads
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    logits_BKGTS = jnp.einsum(
      "bkgth,bkhs->bkgts", q_BKGTH, k_BKHS, preferred_element_type=jnp.float32
    )
    allowed_B11TS = allowed_BTS[:, None, None]
    logits_BKGTS = jnp.where(allowed_B11TS, logits_BKGTS * (H**-0.5), _NEG_INF)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum(
      "bkgts,bksh->bkgth", probs_BKGTS, v_BKSH, preferred_element_type=jnp.float32
    )
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
    if T > 1:
      return self.out_proj(out_BTNH)
    # Contract over N*H as one axis: an "nh" pair makes XLA transpose o_NHD every step.
    o_FD = self.o_NHD[...].astype(cfg.jnp_dtype).reshape(N * H, cfg.hidden_size)
    out_BD = out_BTNH.reshape(B, N * H) @ o_FD
    if cfg.o_bias:
      out_BD = out_BD + self.o_bias_D[...].astype(cfg.jnp_dtype)
    return out_BD[:, None]

  def out_proj(self, out_BTNH):
    cfg = self.cfg
    B, T, N, H = out_BTNH.shape
    o_FD = self.o_NHD[...].astype(cfg.jnp_dtype).reshape(N * H, cfg.hidden_size)
    out = dense(out_BTNH.reshape(B, T, N * H), o_FD)
    if cfg.o_bias:
      out = out + self.o_bias_D[...].astype(cfg.jnp_dtype)
    return out


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
    self.dtype = cfg.jnp_dtype
    self.gate_DF = _param(rngs, (D, F), ("embed", "mlp"), pd, 0.02)
    self.up_DF = _param(rngs, (D, F), ("embed", "mlp"), pd, 0.02)
    self.down_FD = _param(rngs, (F, D), ("mlp", "embed"), pd, 0.02)

  def __call__(self, x_BTD):
    dt = self.dtype
    gate = dense(x_BTD, self.gate_DF[...].astype(dt))
    up = dense(x_BTD, self.up_DF[...].astype(dt))
    h = shard(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(h, self.down_FD[...].astype(dt))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, dt = cfg.jnp_param_dtype, cfg.jnp_dtype
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, dt)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, dt)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, inv_freq, segment_ids_BT):
    """Self-attention over the rows; returns (x, (k_BTKH, v_BTKH))."""
    q, k, v = self.attn.project(self.attn_norm(x_BTD), positions_BT, inv_freq)
    x_BTD = x_BTD + self.attn.attend(q, k, v, segment_ids_BT)
    return self._mlp_residual(x_BTD), (k, v)

  def decode(self, x_BTD, positions_BT, inv_freq, allowed_BTS, kv, index):
    """kv: this layer's (k_BKHS, v_BKSH) cache; returns (x, (k, v)) with the T new slots
    written at `index`."""
    q, k, v = self.attn.project(self.attn_norm(x_BTD), positions_BT, inv_freq)
    k, v = write_kv(kv, k, v, index)
    x_BTD = x_BTD + self.attn.attend_cache(q, k, v, allowed_BTS)
    return self._mlp_residual(x_BTD), (k, v)

  def _mlp_residual(self, x_BTD):
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return shard(x_BTD, ("batch", "length", "embed"))


def write_kv(kv, k_BTKH, v_BTKH, index):
  """The layer cache (k [B, K, H, S], v [B, K, S, H]) with T new slots written at index."""
  k_cache, v_cache = kv
  zero = jnp.zeros((), jnp.int32)
  k_BKHT = k_BTKH.astype(k_cache.dtype).transpose(0, 2, 3, 1)
  v_BKTH = v_BTKH.astype(v_cache.dtype).transpose(0, 2, 1, 3)
  k = jax.lax.dynamic_update_slice(k_cache, k_BKHT, (zero, zero, zero, index))
  v = jax.lax.dynamic_update_slice(v_cache, v_BKTH, (zero, zero, index, zero))
  return k, v


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed_VD = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, 0.02)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cfg.jnp_dtype)
    if not cfg.tie_embeddings:
      self.lm_head_DV = _param(
        rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, 0.02
      )

  # -- pieces shared by both paths -------------------------------------------------------
  def embed(self, tokens_BT: jax.Array) -> jax.Array:
    x = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(self.cfg.jnp_dtype)
    return shard(x, ("batch", "length", "embed"))

  def lm_head_weight(self) -> jax.Array:
    """[D, V] output projection in the compute dtype (the transposed embedding table when
    tied): the sampler's `logits` and the learner's chunked logprobs both use this."""
    w = self.embed_VD[...].T if self.cfg.tie_embeddings else self.lm_head_DV[...]
    return w.astype(self.cfg.jnp_dtype)

  def logits(self, hidden_BTD: jax.Array) -> jax.Array:
    """Final-normed hidden states -> float32 logits [B, T, V]."""
    w = self.lm_head_weight()
    out = jnp.einsum("btd,dv->btv", hidden_BTD, w, preferred_element_type=jnp.float32)
    return shard(out, ("batch", "length", "vocab"))

  # -- full forward -----------------------------------------------------------------------
  def __call__(
    self,
    tokens_BT,
    positions_BT,
    mask_BT=None,
    *,
    segment_ids_BT=None,
    return_hidden: bool = False,
    remat: bool = False,
  ):
    """Causal forward over padded (mask_BT) or packed (segment_ids_BT) rows; give one of
    the two. Returns float32 logits [B, T, V] (or the final-normed hidden states [B, T, D]
    with return_hidden=True). remat=True recomputes each block's activations in the
    backward pass (only block inputs are kept): the learner's memory then grows with one
    block's working set, not L of them."""
    seg_BT = segment_ids(mask_BT, segment_ids_BT)
    inv_freq = rope_inv_freq(self.cfg)
    x = self.embed(tokens_BT)
    block = lambda layer, x: layer(x, positions_BT, inv_freq, seg_BT)[0]
    if remat:
      block = nnx.remat(block)
    for layer in self.layers:
      x = block(layer, x)
    h = self.final_norm(x)
    return h if return_hidden else self.logits(h)

  def prefill(self, tokens_BT, positions_BT, mask_BT, cache: KVCache, *, return_hidden=False):
    """`decode` of a whole prompt into an empty cache (index 0; earlier slots would be
    ignored): the prompt attends to itself through cfg.attention_impl, as in `__call__`,
    and its keys/values go to slots [index, index + T). Returns (logits or hidden, cache)."""
    T = tokens_BT.shape[1]
    seg_BT = segment_ids(mask_BT, None)
    inv_freq = rope_inv_freq(self.cfg)
    x = self.embed(tokens_BT)
    ks, vs = [], []
    for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v, strict=True):
      x, (k, v) = layer(x, positions_BT, inv_freq, seg_BT)
      k, v = write_kv((k_cache, v_cache), k, v, cache.index)
      ks.append(k)
      vs.append(v)
    h = self.final_norm(x)
    zero = jnp.zeros((), jnp.int32)
    valid_BS = jax.lax.dynamic_update_slice(
      cache.valid_BS, mask_BT.astype(bool), (zero, cache.index)
    )
    new_cache = KVCache(k=tuple(ks), v=tuple(vs), valid_BS=valid_BS, index=cache.index + T)
    return (h if return_hidden else self.logits(h)), new_cache

  # -- cached path ------------------------------------------------------------------------
  def decode(self, tokens_BT, positions_BT, mask_BT, cache: KVCache, *, return_hidden=False):
    """Append T tokens to the cache and return (float32 logits [B, T, V], new cache), or
    (final-normed hidden [B, T, D], new cache) with return_hidden=True.

    The new tokens go to slots [index, index + T); query t sees slot s when the slot holds
    a real token and s <= index + t.
    """
    B, T = tokens_BT.shape
    S = cache.size
    index = cache.index
    valid_BS = jax.lax.dynamic_update_slice(
      cache.valid_BS, mask_BT.astype(bool), (jnp.zeros((), jnp.int32), index)
    )
    slots_S = jnp.arange(S)
    causal_TS = slots_S[None, :] <= (index + jnp.arange(T))[:, None]
    allowed_BTS = causal_TS[None] & valid_BS[:, None, :]
    inv_freq = rope_inv_freq(self.cfg)
    x = self.embed(tokens_BT)
    ks, vs = [], []
    for layer, k, v in zip(self.layers, cache.k, cache.v, strict=True):
      x, (k, v) = layer.decode(x, positions_BT, inv_freq, allowed_BTS, (k, v), index)
      ks.append(k)
      vs.append(v)
    h = self.final_norm(x)
    new_cache = KVCache(k=tuple(ks), v=tuple(vs), valid_BS=valid_BS, index=index + T)
    return (h if return_hidden else self.logits(h)), new_cache
