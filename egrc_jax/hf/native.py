"""Our own checkpoint of a model: orbax parameters plus the `ModelConfig` as JSON.

Layout of `dir`: model_config.json and params/ (an orbax StandardCheckpointer tree of the
nnx parameter state as a pure dict). Restoring goes through the abstract model with its
shardings, so each device reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from egrc_jax.model import ModelConfig, Transformer
from egrc_jax.sharding import abstract_model, state_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_json(cfg: ModelConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"


def config_from_json(text: str) -> ModelConfig:
  d = json.loads(text)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{CONFIG_FILE} has unknown fields {unknown}; known: {sorted(known)}")
  d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
  return ModelConfig(**d)


def save_native(model: Transformer, directory: str | os.PathLike) -> None:
  """Write `model` to `directory` (created; must not already hold a checkpoint)."""
  d = pathlib.Path(directory).absolute()
  if (d / PARAMS_DIR).exists():
    raise FileExistsError(f"{d / PARAMS_DIR} already exists; choose a new checkpoint directory")
  d.mkdir(parents=True, exist_ok=True)
  state = nnx.state(model, nnx.Param).to_pure_dict()
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(d / PARAMS_DIR, state)
    ckpt.wait_until_finished()
  if jax.process_index() == 0:
    (d / CONFIG_FILE).write_text(config_to_json(model.cfg))


def load_native(
  directory: str | os.PathLike, mesh: Mesh | None = None
) -> tuple[ModelConfig, Transformer]:
  """(config, model) from a directory written by `save_native`, sharded over `mesh` if given."""
  d = pathlib.Path(directory).absolute()
  if not (d / CONFIG_FILE).exists() or not (d / PARAMS_DIR).exists():
    raise FileNotFoundError(
      f"{d} is not a native checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ written by "
      "egrc_jax.hf.save_native); for a Hugging Face directory use `import` / load_model"
    )
  cfg = config_from_json((d / CONFIG_FILE).read_text())
  graphdef, abstract = abstract_model(cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract.to_pure_dict()
    )
  else:
    shardings = state_shardings(abstract, mesh).to_pure_dict()
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract.to_pure_dict(),
      shardings,
    )
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(d / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(abstract, restored)
  return cfg, nnx.merge(graphdef, abstract)
