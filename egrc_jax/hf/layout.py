"""Where each of our parameters lives in a Hugging Face checkpoint, and how it is laid out.

Shape letters: V vocab, D hidden, F MLP width, N query heads, K key/value heads, H head dim.

HF `nn.Linear` stores weight[out, in] and computes y = x @ W.T; we store [in, out] with the
head axes split out (q_DNH, o_NHD, ...), so each entry has a pair of pure numpy maps,
`to_ours(hf_array)` and `to_hf(our_array)`, that are each other's inverse and only
transpose / reshape (returning views where numpy can, so a memory-mapped tensor is not
copied until a device's shard of it is read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from egrc_jax.model import ModelConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_name: str
  path: Path  # path of the nnx Param inside `Transformer`, as in nnx.to_flat_state
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _transpose(x):
  return x.T


def _linear_in(out_axes: tuple[int, ...]):
  """HF weight [prod(out_axes), in] <-> ours [in, *out_axes] (q_DNH, k_DKH, v_DKH)."""

  def to_ours(w):
    return w.reshape(*out_axes, w.shape[1]).transpose(len(out_axes), *range(len(out_axes)))

  def to_hf(x):
    return x.transpose(*range(1, x.ndim), 0).reshape(-1, x.shape[0])

  return to_ours, to_hf


def _linear_out(in_axes: tuple[int, ...]):
  """HF weight [out, prod(in_axes)] <-> ours [*in_axes, out] (o_NHD)."""

  def to_ours(w):
    return w.reshape(w.shape[0], *in_axes).transpose(*range(1, len(in_axes) + 1), 0)

  def to_hf(x):
    return x.transpose(x.ndim - 1, *range(x.ndim - 1)).reshape(x.shape[-1], -1)

  return to_ours, to_hf


def _bias(axes: tuple[int, ...]):
  return (lambda b: b.reshape(axes)), (lambda x: x.reshape(-1))


def layout(cfg: ModelConfig) -> list[Entry]:
  """Every parameter of `Transformer(cfg)` with its HF name, in HF state-dict order."""
  V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  e = [Entry("model.embed_tokens.weight", ("embed_VD",), (V, D), _same, _same)]
  for i in range(cfg.num_layers):
    hf, us = f"model.layers.{i}.", ("layers", i)
    a, att = hf + "self_attn.", (*us, "attn")
    e.append(Entry(hf + "input_layernorm.weight", (*us, "attn_norm", "scale"), (D,), _same, _same))
    e.append(Entry(a + "q_proj.weight", (*att, "q_DNH"), (N * H, D), *_linear_in((N, H))))
    e.append(Entry(a + "k_proj.weight", (*att, "k_DKH"), (K * H, D), *_linear_in((K, H))))
    e.append(Entry(a + "v_proj.weight", (*att, "v_DKH"), (K * H, D), *_linear_in((K, H))))
    e.append(Entry(a + "o_proj.weight", (*att, "o_NHD"), (D, N * H), *_linear_out((N, H))))
    if cfg.qkv_bias:
      e.append(Entry(a + "q_proj.bias", (*att, "q_bias_NH"), (N * H,), *_bias((N, H))))
      e.append(Entry(a + "k_proj.bias", (*att, "k_bias_KH"), (K * H,), *_bias((K, H))))
      e.append(Entry(a + "v_proj.bias", (*att, "v_bias_KH"), (K * H,), *_bias((K, H))))
    if cfg.o_bias:
      e.append(Entry(a + "o_proj.bias", (*att, "o_bias_D"), (D,), _same, _same))
    if cfg.qk_norm:
      e.append(Entry(a + "q_norm.weight", (*att, "q_norm", "scale"), (H,), _same, _same))
      e.append(Entry(a + "k_norm.weight", (*att, "k_norm", "scale"), (H,), _same, _same))
    e.append(
      Entry(hf + "post_attention_layernorm.weight", (*us, "mlp_norm", "scale"), (D,), _same, _same)
    )
    m, mlp = hf + "mlp.", (*us, "mlp")
    e.append(Entry(m + "gate_proj.weight", (*mlp, "gate_DF"), (F, D), _transpose, _transpose))
    e.append(Entry(m + "up_proj.weight", (*mlp, "up_DF"), (F, D), _transpose, _transpose))
    e.append(Entry(m + "down_proj.weight", (*mlp, "down_FD"), (D, F), _transpose, _transpose))
  e.append(Entry("model.norm.weight", ("final_norm", "scale"), (D,), _same, _same))
  if not cfg.tie_embeddings:
    e.append(Entry("lm_head.weight", ("lm_head_DV",), (V, D), _transpose, _transpose))
  return e


# Present in some tied checkpoints as a copy of the embedding; transformers ignores it too.
TIED_EXTRA = "lm_head.weight"
