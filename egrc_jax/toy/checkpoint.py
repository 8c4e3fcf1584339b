"""Saving and loading the SFT model with its tokenizer.

Layout of DIR: config.json (our ModelConfig fields), params/ (an orbax checkpoint of the
nnx parameter state) and tokenizer/ (a copy of the tokenizer files).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from egrc_jax.model import ModelConfig, Transformer
from egrc_jax.sharding import abstract_model


def save_sft(model: Transformer, tokenizer_dir, out_dir) -> pathlib.Path:
  out = pathlib.Path(out_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
  if (out / "params").exists():
    shutil.rmtree(out / "params")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(out / "params", nnx.state(model))
  if pathlib.Path(tokenizer_dir).absolute() != out / "tokenizer":
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
  return out


def load_sft(path) -> tuple[Transformer, object]:
  """(model, tokenizer) from a directory written by save_sft."""
  from transformers import AutoTokenizer

  path = pathlib.Path(path).absolute()
  fields = json.loads((path / "config.json").read_text())
  fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
  cfg = ModelConfig(**fields)
  graphdef, abstract_state = abstract_model(cfg)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state,
  )
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(path / "params", target)
  tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
  return nnx.merge(graphdef, state), tokenizer
