"""Find and load the model and tokenizer an evaluation (or an analysis, or a release) reads.

`--model` may name:
  * a Hugging Face directory (config.json + *.safetensors): `egrc_jax.hf.load_model`;
  * a trainer workdir: its `hf_final/` when the run finished, else the params of its latest
    orbax checkpoint `checkpoints/<step>/`;
  * one trainer checkpoint directory `<workdir>/checkpoints/<step>` (holding `state/`, `meta/`).

A trainer checkpoint is read by `egrc_jax.trainer.checkpoint.restore_params`, the reader
next to its writer: only the `params` subtree, with the model config from its `meta`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from jax.sharding import Mesh

from egrc_jax import hf
from egrc_jax.model import ModelConfig, Transformer
from egrc_jax.trainer.checkpoint import restore_params

HF_FINAL = "hf_final"


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a model's weights and tokenizer are. kind: "hf" | "checkpoint"."""

  kind: str
  path: pathlib.Path  # the HF directory, or the checkpoint step directory
  tokenizer_dir: pathlib.Path | None  # None: the caller must name one
  run_config: dict | None  # the trainer's <workdir>/config.json, when there is one


def _is_hf_dir(p: pathlib.Path) -> bool:
  return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def _is_step_dir(p: pathlib.Path) -> bool:
  return (p / "state").is_dir() and (p / "meta").is_dir()


def _read_json(p: pathlib.Path) -> dict | None:
  return json.loads(p.read_text()) if p.is_file() else None


def _run_tokenizer_dir(run_config: dict | None) -> pathlib.Path | None:
  """The tokenizer directory a trainer run used, from its config (model.tokenizer_path or
  model.hf_path), when that is a directory that exists here."""
  model = (run_config or {}).get("model", {})
  for key in ("tokenizer_path", "hf_path"):
    v = model.get(key)
    if v and os.path.isdir(v):
      return pathlib.Path(v)
  return None


def resolve(path: str | os.PathLike) -> ModelSource:
  """Classify `path` (see the module docstring); raises FileNotFoundError with what was
  looked for when it is none of the accepted layouts."""
  p = pathlib.Path(path)
  if _is_hf_dir(p):
    run_config = _read_json(p.parent / "config.json") if p.name == HF_FINAL else None
    return ModelSource("hf", p, p, run_config)
  if _is_step_dir(p):
    workdir = p.parent.parent
    run_config = _read_json(workdir / "config.json")
    tok = workdir / HF_FINAL if (workdir / HF_FINAL).is_dir() else _run_tokenizer_dir(run_config)
    return ModelSource("checkpoint", p, tok, run_config)
  if _is_hf_dir(p / HF_FINAL):
    return ModelSource("hf", p / HF_FINAL, p / HF_FINAL, _read_json(p / "config.json"))
  ckpts = p / "checkpoints"
  steps = sorted(int(d.name) for d in ckpts.glob("*") if d.name.isdigit()) if ckpts.is_dir() else []
  if steps:
    return resolve(ckpts / str(steps[-1]))
  raise FileNotFoundError(
    f"{p} is not a model: expected a Hugging Face directory (config.json + *.safetensors), a "
    f"trainer workdir (with {HF_FINAL}/ or checkpoints/<step>/), or a checkpoint step directory "
    "(with state/ and meta/)"
  )


def load(
  path: str | os.PathLike,
  mesh: Mesh | None = None,
  *,
  param_dtype: str | None = None,
  dtype: str | None = None,
) -> tuple[ModelSource, ModelConfig, Transformer]:
  """(source, config, model) for any accepted `--model` path."""
  src = resolve(path)
  if src.kind == "hf":
    cfg, model = hf.load_model(src.path, mesh, param_dtype=param_dtype, dtype=dtype)
  else:
    cfg, model = restore_params(src.path, mesh)
  return src, cfg, model


def load_tokenizer(src: ModelSource, override: str | None = None):
  """The `transformers` tokenizer of `src` (or of the `override` directory)."""
  from egrc_jax.data.chat import load_tokenizer as load_dir

  where = pathlib.Path(override) if override else src.tokenizer_dir
  if where is None:
    raise ValueError(
      f"no tokenizer found for {src.path} (the run has no {HF_FINAL}/ and its config names no "
      "tokenizer directory); pass --tokenizer=<directory with tokenizer.json>"
    )
  return load_dir(where)
