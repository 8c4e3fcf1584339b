"""Hugging Face format: config.json mapping, safetensors import/export, native checkpoints.

  cfg, model = load_model(hf_dir, mesh)            # HF directory -> sharded Transformer
  model = model_from_state_dict(cfg, tensors, mesh)  # HF-named numpy tensors -> Transformer
  export_model(model, out_dir, tokenizer_dir=...)  # Transformer -> HF directory
  save_native(model, dir) / load_native(dir, mesh) # our orbax checkpoint + config JSON

CLI: `python -m egrc_jax.hf export|import --help`.
"""

from egrc_jax.hf.config import UnsupportedConfigError, config_from_hf, config_to_hf
from egrc_jax.hf.export import export_model
from egrc_jax.hf.load import CheckpointError, load_model, model_from_state_dict
from egrc_jax.hf.native import load_native, save_native
from egrc_jax.hf.safetensors_file import CorruptSafetensorsError

__all__ = [
  "CheckpointError",
  "CorruptSafetensorsError",
  "UnsupportedConfigError",
  "config_from_hf",
  "config_to_hf",
  "export_model",
  "load_model",
  "load_native",
  "model_from_state_dict",
  "save_native",
]
