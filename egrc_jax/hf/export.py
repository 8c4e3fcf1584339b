"""Write a `Transformer` as a Hugging Face directory that `AutoModelForCausalLM` loads.

Output: config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards plus
model.safetensors.index.json when the weights exceed `max_shard_bytes`),
generation_config.json, and the tokenizer files copied from `tokenizer_dir`. Parameters
are fetched to the host one tensor at a time and one shard is held in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from egrc_jax.hf.config import config_to_hf
from egrc_jax.hf.layout import Entry, layout
from egrc_jax.hf.load import INDEX_FILE, SINGLE_FILE, Progress
from egrc_jax.model import Transformer

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "chat_template.jinja",
  "chat_template.json",
)
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:  # multi-host: gather the global array to every process
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def plan_shards(entries: list[Entry], itemsize: int, max_shard_bytes: int) -> list[list[Entry]]:
  """Greedy grouping in state-dict order; a tensor larger than the limit gets its own shard."""
  shards: list[list[Entry]] = [[]]
  size = 0
  for e in entries:
    n = math.prod(e.hf_shape) * itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  return shards


def _clear_old_model(out: pathlib.Path, overwrite: bool) -> None:
  old = [p for p in out.glob("*.safetensors")] + [out / INDEX_FILE, out / "config.json"]
  old = [p for p in old if p.exists()]
  if old and not overwrite:
    raise FileExistsError(
      f"{out} already holds a model ({', '.join(p.name for p in old[:4])}); choose an empty "
      "directory or pass overwrite=True (--overwrite) to replace it"
    )
  for p in old:
    p.unlink()


def export_model(
  model: Transformer,
  out_dir: str | os.PathLike,
  tokenizer_dir: str | os.PathLike | None = None,
  generation_config: dict[str, Any] | None = None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  *,
  dtype: str | None = None,
  overwrite: bool = False,
  progress: Progress = None,
) -> list[str]:
  """Write `model` to `out_dir` in HF format and return the file names written.

  dtype: 'float32' | 'bfloat16' to cast the weights (default: cfg.param_dtype); config.json
  records it. generation_config: extra keys for generation_config.json (bos/eos come from
  the model config). Only process 0 writes files; every process must call this.
  """
  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  if dtype not in _NP_DTYPES:
    raise ValueError(f"export dtype={dtype!r}: use one of {sorted(_NP_DTYPES)}")
  np_dtype = _NP_DTYPES[dtype]
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
  out = pathlib.Path(out_dir)
  writer = jax.process_index() == 0
  if writer:
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_model(out, overwrite)

  entries = layout(cfg)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  shards = plan_shards(entries, np_dtype.itemsize, max_shard_bytes)
  n = len(shards)
  names = (
    [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  )
  weight_map, total, written = {}, 0, []
  for fname, shard in zip(names, shards, strict=True):
    arrays = {}
    for e in shard:
      arrays[e.hf_name] = np.ascontiguousarray(e.to_hf(_host(params[e.path].get_value())))
      arrays[e.hf_name] = arrays[e.hf_name].astype(np_dtype, copy=False)
      weight_map[e.hf_name] = fname
    nbytes = sum(a.nbytes for a in arrays.values())
    total += nbytes
    if writer:
      save_file(arrays, out / fname, metadata={"format": "pt"})
      written.append(fname)
      if progress:
        progress(f"wrote {fname}: {len(arrays)} tensors, {nbytes / 2**20:.1f} MiB")
    del arrays
  if not writer:
    return []
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    written.append(INDEX_FILE)

  hf_cfg = config_to_hf(cfg)
  hf_cfg["dtype"] = dtype
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  eos = list(cfg.eos_token_ids)
  gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
  if cfg.pad_token_id is not None:
    gen["pad_token_id"] = cfg.pad_token_id
  gen = {k: v for k, v in gen.items() if v not in (None, [])}
  gen.update(generation_config or {})
  (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
  written += ["config.json", "generation_config.json"]

  if tokenizer_dir is not None:
    tok = pathlib.Path(tokenizer_dir)
    found = [f for f in TOKENIZER_FILES if (tok / f).is_file()]
    if not found:
      raise FileNotFoundError(
        f"tokenizer_dir={tok} has none of {TOKENIZER_FILES}; point it at the directory the "
        "tokenizer was saved to (e.g. the original HF model directory)"
      )
    for f in found:
      shutil.copyfile(tok / f, out / f)
    written += found
  if progress:
    progress(f"exported {len(entries)} tensors, {total / 2**20:.1f} MiB, to {out}")
  return written
