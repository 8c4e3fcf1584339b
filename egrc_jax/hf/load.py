"""Load a Hugging Face safetensors directory (or an in-memory state dict) into `Transformer`.

No torch: tensors are memory-mapped (`SafetensorsFile`), converted to our layout as numpy
views (`layout.Entry.to_ours`) and placed one at a time. With a mesh, each parameter is
built by `jax.make_array_from_callback` with its NamedSharding from
`egrc_jax.sharding.state_shardings`, so every device reads only its own slice of the file
and the full model never exists on one host buffer or device.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from egrc_jax.hf.config import config_from_hf
from egrc_jax.hf.layout import TIED_EXTRA, layout
from egrc_jax.hf.safetensors_file import SafetensorsFile
from egrc_jax.model import ModelConfig, Transformer
from egrc_jax.sharding import abstract_model, state_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
Progress = Callable[[str], None] | None


class CheckpointError(ValueError):
  """The checkpoint's tensors do not match what its config.json describes."""


def _names(names, limit: int = 8) -> str:
  names = sorted(names)
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def model_from_state_dict(
  cfg: ModelConfig,
  tensors: Mapping[str, np.ndarray],
  mesh: Mesh | None = None,
  *,
  progress: Progress = None,
) -> Transformer:
  """Build `Transformer(cfg)` from HF-named tensors ([out, in] Linear weights, any float dtype).

  Values are cast to cfg.param_dtype. With `mesh`, each parameter is created directly with
  its logical sharding; otherwise on the default device. `tensors` may be lazy (memmaps):
  each is read once, and with a mesh only the slices the devices need are read.
  """
  entries = layout(cfg)
  expected = {e.hf_name for e in entries}
  missing = expected - set(tensors)
  if missing:
    raise CheckpointError(
      f"checkpoint is missing {len(missing)} tensor(s) that config {cfg.model_type} needs: "
      f"{_names(missing)}; check num_hidden_layers/attention_bias/tie_word_embeddings in "
      "config.json against the weights"
    )
  allowed_extra = {TIED_EXTRA} if cfg.tie_embeddings else set()
  unexpected = set(tensors) - expected - allowed_extra
  if unexpected:
    raise CheckpointError(
      f"checkpoint has {len(unexpected)} tensor(s) this config does not use: "
      f"{_names(unexpected)}; the config.json probably does not describe these weights"
    )
  for e in entries:
    got = tuple(tensors[e.hf_name].shape)
    if got != e.hf_shape:
      raise CheckpointError(
        f"tensor {e.hf_name!r} has shape {got}, expected {e.hf_shape} from config.json"
      )

  graphdef, abstract = abstract_model(cfg)
  flat = dict(nnx.to_flat_state(abstract))
  if set(flat) != {e.path for e in entries}:  # layout.py out of step with the model
    raise AssertionError(f"layout/model mismatch: {set(flat) ^ {e.path for e in entries}}")
  shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh))) if mesh else {}
  dtype = cfg.jnp_param_dtype
  leaves, done_bytes = [], 0
  for i, e in enumerate(entries):
    var = flat[e.path]
    ours = e.to_ours(tensors[e.hf_name])  # a view: nothing read yet for memmaps
    if mesh is None:
      value = jax.device_put(np.asarray(ours).astype(dtype))
    else:
      read = lambda idx, ours=ours: np.ascontiguousarray(ours[idx]).astype(dtype)
      value = jax.make_array_from_callback(var.shape, shardings[e.path].get_value(), read)
    leaves.append((e.path, var.replace(value)))
    done_bytes += value.size * value.dtype.itemsize
    if progress is not None and ((i + 1) % 50 == 0 or i + 1 == len(entries)):
      progress(f"loaded {i + 1}/{len(entries)} tensors, {done_bytes / 2**20:.1f} MiB")
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


class _LazyTensors(Mapping):
  """name -> memmap view, over the shard files of one checkpoint directory."""

  def __init__(self, files: dict[str, SafetensorsFile], where: dict[str, str]):
    self._files, self._where = files, where

  def __getitem__(self, name: str) -> np.ndarray:
    return self._files[self._where[name]].get(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def open_safetensors_dir(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """All tensors of an HF directory (single file or index + shards) as lazy memmap views."""
  path = pathlib.Path(path)
  index_path = path / INDEX_FILE
  if index_path.exists():
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
      by_file.setdefault(fname, []).append(name)
    absent = [f for f in by_file if not (path / f).exists()]
    if absent:
      f = absent[0]
      raise CheckpointError(
        f"{index_path} names shard file {f!r}, which is not in {path} (it should hold "
        f"{len(by_file[f])} tensors: {_names(by_file[f])}); copy or re-download that file"
      )
    files = {f: SafetensorsFile(path / f) for f in by_file}
    for f, names in by_file.items():
      lost = set(names) - set(files[f].keys())
      if lost:
        raise CheckpointError(f"{INDEX_FILE} says {f} holds {_names(lost)}, but it does not")
    return _LazyTensors(files, dict(weight_map))
  single = path / SINGLE_FILE
  if not single.exists():
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise FileNotFoundError(
      f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (safetensors files there: {found}); "
      "export the model with safe_serialization=True"
    )
  f = SafetensorsFile(single)
  return _LazyTensors({SINGLE_FILE: f}, {k: SINGLE_FILE for k in f.keys()})


def read_hf_config(path: str | os.PathLike) -> dict:
  config_path = pathlib.Path(path) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(
      f"{config_path} not found: point at a Hugging Face model directory (config.json plus "
      "*.safetensors)"
    )
  return json.loads(config_path.read_text())


def load_model(
  path: str | os.PathLike,
  mesh: Mesh | None = None,
  *,
  param_dtype: str | None = None,
  dtype: str | None = None,
  attention_impl: str | None = None,
  progress: Progress = None,
) -> tuple[ModelConfig, Transformer]:
  """(config, model) from an HF directory: config.json + model.safetensors or sharded files.

  param_dtype / dtype override the checkpoint's dtype ('float32' | 'bfloat16');
  attention_impl picks the attention implementation (not an HF setting; default auto).
  """
  cfg = config_from_hf(read_hf_config(path), param_dtype=param_dtype, dtype=dtype)
  if attention_impl is not None:
    cfg = cfg.replace(attention_impl=attention_impl)
  tensors = open_safetensors_dir(path)
  if progress:
    progress(f"{path}: {cfg.model_type}, {len(tensors)} tensors, {cfg.num_params():,} params")
  return cfg, model_from_state_dict(cfg, tensors, mesh, progress=progress)
