"""Hugging Face config.json <-> `ModelConfig`, for the qwen2, llama and qwen3 families.

Reads both the transformers 5 form (`rope_parameters = {rope_type, rope_theta, ...}`) and the
older one (top-level `rope_theta` plus `rope_scaling = {type|rope_type, factor, ...}`); writes
the transformers 5.24 form. Any field that would change the forward pass in a way our model
does not implement (sliding-window attention, MLP bias, another activation or RoPE type) is
an error that names the field, its value and what to do, never a silent mismatch.
"""

from __future__ import annotations

from typing import Any

from egrc_jax.model import ModelConfig

_ARCHITECTURES = {
  "qwen2": "Qwen2ForCausalLM",
  "llama": "LlamaForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}

# The transformers 5.24 class defaults that matter when a config.json leaves a field out.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
  "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
  "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
  "qwen3": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
}
_DEFAULT_THETA = 10000.0
_DTYPES = ("float32", "bfloat16")


class UnsupportedConfigError(ValueError):
  """A config.json field asks for something this model does not implement."""


def _unsupported(field: str, value, why: str) -> UnsupportedConfigError:
  return UnsupportedConfigError(f"config.json: {field}={value!r} is not supported: {why}")


def _require(d: dict, key: str):
  if key not in d or d[key] is None:
    raise ValueError(f"config.json has no {key!r}; every qwen2/llama/qwen3 config must set it")
  return d[key]


def _rope_fields(d: dict) -> dict[str, Any]:
  """Our rope_* fields from either `rope_parameters` (new) or `rope_scaling` (old)."""
  rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
  if not isinstance(rope, dict):
    raise _unsupported("rope_parameters", rope, "expected a dict {rope_type, rope_theta, ...}")
  if any(isinstance(v, dict) for v in rope.values()):
    raise _unsupported(
      "rope_parameters", rope, "per-layer-type RoPE is not implemented; use one global dict"
    )
  theta = rope.get("rope_theta", d.get("rope_theta", _DEFAULT_THETA))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _unsupported("partial_rotary_factor", partial, "only full rotary embeddings (1.0)")
  out: dict[str, Any] = dict(rope_theta=float(theta))
  if rope_type == "default":
    return out
  if rope_type != "llama3":
    raise _unsupported("rope_type", rope_type, "only 'default' and 'llama3' RoPE are implemented")
  for key in ("factor", "low_freq_factor", "high_freq_factor"):
    if key not in rope:
      raise ValueError(f"config.json: llama3 RoPE needs {key!r}; got rope parameters {rope}")
  original = rope.get(
    "original_max_position_embeddings",
    d.get("original_max_position_embeddings", d.get("max_position_embeddings")),
  )
  out.update(
    rope_scaling_factor=float(rope["factor"]),
    rope_low_freq_factor=float(rope["low_freq_factor"]),
    rope_high_freq_factor=float(rope["high_freq_factor"]),
    rope_original_max_position=int(original),
  )
  return out


def _check_unsupported(d: dict, num_layers: int) -> None:
  if d.get("hidden_act", "silu") != "silu":
    raise _unsupported("hidden_act", d["hidden_act"], "only 'silu' (SwiGLU) is implemented")
  if d.get("use_sliding_window"):
    raise _unsupported(
      "use_sliding_window",
      True,
      "sliding-window attention is not implemented; use a checkpoint with full attention "
      "everywhere (set use_sliding_window=false only if the model was trained that way)",
    )
  layer_types = d.get("layer_types") or ["full_attention"] * num_layers
  other = sorted({t for t in layer_types if t != "full_attention"})
  if other:
    raise _unsupported("layer_types", other, "only 'full_attention' layers are implemented")
  if d.get("mlp_bias"):
    raise _unsupported("mlp_bias", True, "the SwiGLU MLP here has no bias")


def _dtype(d: dict, override: str | None, field: str) -> str:
  if override is not None:
    return override
  value = d.get("dtype") or d.get("torch_dtype") or "float32"
  if value not in _DTYPES:
    raise ValueError(
      f"config.json: dtype={value!r} is not one of {_DTYPES}; pass {field}='float32' or "
      f"'bfloat16' to convert the weights on load"
    )
  return value


def config_from_hf(
  d: dict, *, param_dtype: str | None = None, dtype: str | None = None
) -> ModelConfig:
  """A `ModelConfig` from a parsed config.json dict.

  param_dtype defaults to the checkpoint's `dtype` (or older `torch_dtype`); the compute
  dtype defaults to param_dtype.
  """
  model_type = d.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise UnsupportedConfigError(
      f"config.json: model_type={model_type!r} is not supported; egrc_jax implements "
      f"{sorted(_ARCHITECTURES)} (Qwen2/Qwen2.5, Llama 2/3, Qwen3 dense models)"
    )
  defaults = _FAMILY_DEFAULTS[model_type]
  num_layers = int(_require(d, "num_hidden_layers"))
  _check_unsupported(d, num_layers)
  hidden = int(_require(d, "hidden_size"))
  heads = int(_require(d, "num_attention_heads"))
  kv_heads = d.get("num_key_value_heads") or heads
  head_dim = d.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
  if model_type == "qwen2":
    qkv_bias, o_bias = True, False
  else:
    qkv_bias = o_bias = bool(d.get("attention_bias", False))
  eos = d.get("eos_token_id", defaults["eos_token_id"])
  eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
  pd = _dtype(d, param_dtype, "param_dtype")
  return ModelConfig(
    model_type=model_type,
    vocab_size=int(_require(d, "vocab_size")),
    hidden_size=hidden,
    intermediate_size=int(_require(d, "intermediate_size")),
    num_layers=num_layers,
    num_heads=heads,
    num_kv_heads=int(kv_heads),
    head_dim=int(head_dim),
    rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
    qkv_bias=qkv_bias,
    o_bias=o_bias,
    qk_norm=model_type == "qwen3",
    tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    max_position_embeddings=int(
      d.get("max_position_embeddings", defaults["max_position_embeddings"])
    ),
    param_dtype=pd,
    dtype=dtype or pd,
    bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
    eos_token_ids=eos_ids,
    pad_token_id=d.get("pad_token_id"),
    **_rope_fields(d),
  )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json dict (transformers 5.24 form) for `cfg`; inverse of `config_from_hf`."""
  t = cfg.model_type
  if t == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
    raise ValueError(
      f"qwen2 always has q/k/v bias and no o_proj bias; got qkv_bias={cfg.qkv_bias}, "
      f"o_bias={cfg.o_bias}: use model_type='llama' for other bias layouts"
    )
  if t in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
    raise ValueError(
      f"{t} has one attention_bias flag for q/k/v and o; got qkv_bias={cfg.qkv_bias}, "
      f"o_bias={cfg.o_bias}"
    )
  if cfg.qk_norm != (t == "qwen3"):
    raise ValueError(f"qk_norm={cfg.qk_norm} does not match model_type={t!r} (only qwen3 has it)")
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling_factor is not None:
    rope.update(
      rope_type="llama3",
      factor=cfg.rope_scaling_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_position,
    )
  eos = list(cfg.eos_token_ids)
  d: dict[str, Any] = {
    "architectures": [_ARCHITECTURES[t]],
    "model_type": t,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_position_embeddings,
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_parameters": rope,
    "tie_word_embeddings": cfg.tie_embeddings,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    "pad_token_id": cfg.pad_token_id,
    "dtype": cfg.param_dtype,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
  }
  if t in ("llama", "qwen3"):
    d["attention_bias"] = cfg.qkv_bias
  if t == "llama":
    d["mlp_bias"] = False
  else:
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    d["layer_types"] = ["full_attention"] * cfg.num_layers
  return d
