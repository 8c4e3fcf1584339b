"""The run's final model as a Hugging Face directory, with its tokenizer and the
evaluation's sampling settings (eval.temperature, eval.top_p, eval.max_new_tokens: the same
keys the run's figures use) as generation_config.json."""

from __future__ import annotations

import os
import tempfile

from egrc_jax import hf


def export_final(trainer, out_dir: str) -> str:
  c = trainer.config
  with tempfile.TemporaryDirectory() as tok_dir:
    trainer.tokenizer.save_pretrained(tok_dir)
    hf.export_model(
      trainer.model,
      out_dir,
      tokenizer_dir=tok_dir,
      generation_config={
        "do_sample": True,
        "temperature": c.eval.temperature,
        "top_p": c.eval.top_p,
        "max_new_tokens": c.eval.max_new_tokens,
      },
      overwrite=True,
    )
  return os.path.abspath(out_dir)
