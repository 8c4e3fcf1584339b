"""Saving and loading the SFT model with its tokenizer, as a Hugging Face directory.

DIR holds config.json, model.safetensors, generation_config.json and the tokenizer files
(written by `egrc_jax.hf.export_model`), so the toy policy loads like a real one: through
`egrc_jax.hf.load_model(DIR)` and `egrc_jax.data.chat.load_tokenizer(DIR)` (and, for a check,
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`).
"""

from __future__ import annotations

import pathlib

from egrc_jax.data.chat import load_tokenizer
from egrc_jax.hf import export_model, load_model
from egrc_jax.model import Transformer


def save_sft(model: Transformer, tokenizer_dir, out_dir) -> pathlib.Path:
  """Writes the model (float32) and a copy of the tokenizer files to out_dir (replacing a
  model already there)."""
  out = pathlib.Path(out_dir)
  export_model(model, out, tokenizer_dir=tokenizer_dir, dtype="float32", overwrite=True)
  return out


def load_sft(path) -> tuple[Transformer, object]:
  """(model, tokenizer) from a directory written by save_sft."""
  _, model = load_model(path)
  return model, load_tokenizer(path)
