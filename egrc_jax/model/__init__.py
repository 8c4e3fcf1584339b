"""The decoder model: config, presets, the NNX module, its KV cache, attention, row layouts."""

from egrc_jax.model.config import PRESETS, ModelConfig, get_preset
from egrc_jax.model.rows import positions_from_mask, positions_from_segments, segment_ids
from egrc_jax.model.transformer import KVCache, Transformer

__all__ = [
  "PRESETS",
  "KVCache",
  "ModelConfig",
  "Transformer",
  "get_preset",
  "positions_from_mask",
  "positions_from_segments",
  "segment_ids",
]
