"""Orbax checkpoints of a run: the train state plus a JSON record of where the run is.

Layout: <workdir>/checkpoints/<global step>/{state, meta}. `meta` holds the stage index,
the step within the stage, the data iterator state, the RNG counter, the entropy-switch
history and the model config, so re-running the same command resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from egrc_jax.model import ModelConfig


class CheckpointError(RuntimeError):
  pass


def check_writable(workdir: str) -> None:
  """Fail early, before any work, when the workdir cannot be written."""
  if "://" in workdir:  # gs:// and friends: orbax reports permission errors itself
    return
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(
      f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to"
    ) from None


class Checkpointer:
  def __init__(self, workdir: str, keep: int):
    directory = os.path.join(
      os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints"
    )
    self.manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, *, force: bool = True) -> None:
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )
    self.manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore(self, step: int, abstract_state, model_cfg: ModelConfig):
    """Restore the state at `step` onto the shardings of `abstract_state`.

    A checkpoint written for another model shape is refused with both shapes named,
    before orbax reads any array.
    """
    meta = self.restore_meta(step)
    saved = meta.get("model_config", {})
    mine = json_model_config(model_cfg)
    shape_keys = (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "tie_embeddings",
      "qkv_bias",
      "qk_norm",
    )
    diff = {k: (saved.get(k), mine[k]) for k in shape_keys if saved.get(k) != mine[k]}
    if diff:
      detail = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
      raise CheckpointError(
        f"checkpoint step {step} in {self.manager.directory} was written for a different "
        f"model ({detail}); use a fresh --workdir or the matching model config"
      )
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      abstract_state,
    )
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return out["state"], out["meta"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def json_model_config(cfg: ModelConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d["eos_token_ids"] = list(d["eos_token_ids"])
  return d
