"""The decoder model: config, presets, the NNX module and its KV cache."""

from egrc_jax.model.config import PRESETS, ModelConfig, get_preset
from egrc_jax.model.transformer import KVCache, Transformer, positions_from_mask

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "get_preset", "positions_from_mask"]
