"""Model hyper-parameters and the presets for the real models.

`ModelConfig` is a frozen dataclass (hashable, so it can be a static jit argument). Field
names follow our code; `egrc_jax.hf.config` maps them to and from Hugging Face config.json.

The attention_* fields choose how the full forward and the prefill compute attention
(`egrc_jax.model.attention`). They live here, not as `__call__` arguments, because every
caller (learner, reference pass, sampler prefill, evaluation) builds the model from this
config and the choice is then one key, fixed per compiled program (the config is static).
They change the numerics only by rounding, so they are not part of the architecture:
`egrc_jax.hf.config` neither writes them to config.json nor reads them from it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from egrc_jax.model.attention import IMPLS as ATTENTION_IMPLS

MODEL_TYPES = ("qwen2", "llama", "qwen3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str = "qwen2"  # qwen2 | llama | qwen3: which HF family this maps to.
  vocab_size: int = 272  # V (the tiny preset fits the 260-token byte tokenizer)
  hidden_size: int = 64  # D
  intermediate_size: int = 128  # F (SwiGLU inner width)
  num_layers: int = 2  # L
  num_heads: int = 4  # N query heads
  num_kv_heads: int = 2  # K key/value heads (GQA: N % K == 0)
  head_dim: int = 16  # H
  rope_theta: float = 10000.0
  # llama3 RoPE scaling; rope_scaling_factor None means no scaling.
  rope_scaling_factor: float | None = None
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2 has q/k/v projection bias; Llama/Qwen3 usually not.
  o_bias: bool = False  # Llama's attention_bias also adds an o_proj bias.
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  tie_embeddings: bool = False  # lm_head shares the input embedding table.
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"  # float32 | bfloat16
  dtype: str = "float32"  # compute dtype of activations
  # auto | dense | blocked | splash (egrc_jax.model.attention); auto: splash on TPU when the
  # length fits its 128-multiple blocks, blocked (online softmax, skips masked blocks) else.
  attention_impl: str = "auto"
  # Query-block / key-block slots; 0: the implementation's default (blocked: about 64,
  # evened to tile T; splash: min(512, T)).
  attention_block_q: int = 0
  attention_block_kv: int = 0
  attention_block_b: int = 0  # rows per step of blocked; 0: 1 on CPU, all rows elsewhere
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not supported; use one of {MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
      )
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"{name}={getattr(self, name)!r}: use 'float32' or 'bfloat16'")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: use one of {ATTENTION_IMPLS}")
    for name in ("attention_block_q", "attention_block_kv", "attention_block_b"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: the default)")

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count from the shapes alone (matches `transformers` for the same config)."""
    D, F, V, N, K, H = (
      self.hidden_size,
      self.intermediate_size,
      self.vocab_size,
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
    )
    attn = D * N * H + 2 * D * K * H + N * H * D
    if self.qkv_bias:
      attn += N * H + 2 * K * H
    if self.o_bias:
      attn += D
    if self.qk_norm:
      attn += 2 * H
    layer = attn + 3 * D * F + 2 * D
    head = 0 if self.tie_embeddings else V * D
    return V * D + self.num_layers * layer + D + head


PRESETS: dict[str, ModelConfig] = {
  # A few-hundred-kilobyte model for tests and CPU demos.
  "tiny": ModelConfig(),
  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json (Qwen2.5-Math-1.5B architecture).
  "r1_distill_1p5b": ModelConfig(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=False,
    max_position_embeddings=131072,
    param_dtype="bfloat16",
    dtype="bfloat16",
    bos_token_id=151646,
    eos_token_ids=(151643,),
  ),
  # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json (Qwen2.5-Math-7B architecture).
  "r1_distill_7b": ModelConfig(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=False,
    max_position_embeddings=131072,
    param_dtype="bfloat16",
    dtype="bfloat16",
    bos_token_id=151646,
    eos_token_ids=(151643,),
  ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
