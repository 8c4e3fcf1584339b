"""Which KV layout a continuous run uses, how its prompts split over the mesh, and what its
KV costs (from shapes). Layouts: `slot_kv.DenseSlotKV`, `slot_kv.SplitSlotKV`,
`paged_kv.PagedSlotKV`.

Shape letters: P prompts, B slots, Tp prompt bucket, C completion budget, Pg page size.
"""

from __future__ import annotations

from egrc_jax.sampler.config import SamplingConfig
from egrc_jax.sampler.paged_kv import PagedSlotKV, _batch_shards
from egrc_jax.sampler.slot_kv import DenseSlotKV, SplitSlotKV


def resolve_layout(cfg: SamplingConfig, platform: str) -> str:
  """The KV layout a run uses: "auto" is paged on TPU (the kernel) and dense elsewhere."""
  if cfg.kv_layout != "auto":
    return cfg.kv_layout
  return "paged" if platform == "tpu" else "dense"


def prompt_shards(num_prompts: int, num_slots: int) -> int:
  """Dq: the mesh's batch shards when they split both the prompts and the slots (each shard
  then holds its own prompts' cache and decodes their pairs), else 1 (one queue, the
  prompt cache replicated)."""
  D = _batch_shards()
  return D if num_prompts % D == 0 and num_slots % D == 0 else 1


def make_layout(prompt_cache, prompt_len_P, cfg, num_slots, layout, platform, shards):
  """The empty KV layout of `num_slots` slots over the prefilled prompt cache; the paged
  layout runs the Pallas kernel when platform is "tpu"."""
  C = cfg.max_new_tokens
  if layout == "dense":
    return DenseSlotKV.create(prompt_cache, num_slots, C, shards)
  if layout == "split":
    return SplitSlotKV.create(prompt_cache, num_slots, C, shards)
  return PagedSlotKV.create(
    prompt_cache, prompt_len_P, num_slots, C, cfg.page_size, platform == "tpu", shards
  )


def kv_layout_bytes(
  model_cfg,
  cfg: SamplingConfig,
  num_prompts: int,
  prompt_len: int,
  num_slots: int,
  layout: str,
  prompt_copies: int = 1,
) -> dict[str, int]:
  """{prompt, completion} bytes of the continuous loop's KV over all layers and devices,
  from shapes, per layer (k and v): dense P*Tp + B*(Tp + C) token slots, split P*Tp + B*C,
  paged P*n_p + B*W pages of Pg (`slot_kv`, `paged_kv`); lock-step P*G*(Tp + C).
  prompt_copies: D when the prompt cache is replicated over D batch shards (they do not
  split the prompts and slots), else 1."""
  per_token = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim
  per_token *= model_cfg.jnp_dtype.itemsize
  C = cfg.max_new_tokens
  if layout in ("dense", "split"):
    row = prompt_len + C if layout == "dense" else C
    return {
      "prompt": per_token * prompt_copies * num_prompts * prompt_len,
      "completion": per_token * num_slots * row,
    }
  Pg = cfg.page_size
  n_p, W = -(-prompt_len // Pg), -(-(Pg - 1 + C) // Pg)
  return {
    "prompt": per_token * prompt_copies * num_prompts * n_p * Pg,
    "completion": per_token * num_slots * W * Pg,
  }
