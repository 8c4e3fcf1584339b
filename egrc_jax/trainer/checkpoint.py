"""Orbax checkpoints of a run: the train state plus a JSON record of where the run is.

Layout: <workdir>/checkpoints/<global step>/{state, meta}. `meta` holds the stage index,
the step within the stage, the data iterator state, the RNG counter, the entropy-switch
history and the model config, so re-running the same command resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from egrc_jax.cli import UserError
from egrc_jax.model import ModelConfig
from egrc_jax.sharding import abstract_model, state_shardings


class CheckpointError(UserError):
  pass


# The ModelConfig fields that fix the parameter shapes: a checkpoint restores only onto these.
SHAPE_KEYS = (
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


def check_writable(workdir: str, create: bool = True) -> None:
  """Fail early when the workdir cannot be written. create=False checks without creating
  anything (the nearest existing folder must be a writable directory), so a run that is
  refused later for another reason leaves nothing behind."""
  if "://" in workdir:  # gs:// and friends: orbax reports permission errors itself
    return
  path = pathlib.Path(workdir)
  if not create:
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
      what = "is not a directory" if not existing.is_dir() else "is not writable"
      raise CheckpointError(
        f"workdir {workdir!r} cannot be created: {existing} {what}; pass a --workdir you can "
        "write to"
      )
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: the processes of a multi-process run share a workdir on one host
    # (launch/local.sh), and a shared name raced (one process unlinked the other's probe).
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(
      f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to"
    ) from None


def check_model_shape(saved: dict, cfg: ModelConfig, where: str) -> None:
  """Refuse a checkpoint written for another model shape, naming both shapes."""
  mine = json_model_config(cfg)
  diff = {k: (saved.get(k), mine[k]) for k in SHAPE_KEYS if saved.get(k) != mine[k]}
  if diff:
    detail = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
    raise CheckpointError(
      f"{where} was written for a different model ({detail}); use a fresh --workdir or the "
      "matching model config"
    )


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
    check_model_shape(
      meta.get("model_config", {}), model_cfg, f"checkpoint step {step} in {self.manager.directory}"
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

  def step_dir(self, step: int) -> pathlib.Path:
    return pathlib.Path(self.manager.directory) / str(step)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def latest_complete_step(workdir: str) -> int | None:
  """The newest complete checkpoint step of a workdir (local or gs://), read from the file
  listing alone: no CheckpointManager, so no cross-process barrier (every process of a
  multi-host run can call it at any time)."""
  d = epath.Path(workdir) / "checkpoints"
  if not d.is_dir():
    return None
  steps = [
    int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()
  ]
  return max(steps, default=None)


def read_meta(step_dir) -> dict:
  """The JSON `meta` item of a checkpoint step directory."""
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
    return c.restore(epath.Path(step_dir) / "meta")


def model_config_of(step_dir: str | os.PathLike) -> ModelConfig:
  """The ModelConfig a trainer checkpoint step directory was written for (its meta)."""
  step_dir = pathlib.Path(step_dir).absolute()
  meta = read_meta(step_dir)
  if "model_config" not in meta:
    raise CheckpointError(f"{step_dir}/meta has no 'model_config': not a trainer checkpoint")
  d = dict(meta["model_config"])
  d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
  return ModelConfig(**d)


def restore_params(step_dir: str | os.PathLike, mesh: Mesh | None = None):
  """(ModelConfig, Transformer) from the `params` of a trainer checkpoint step directory.

  Only the params subtree of the saved TrainState is read (orbax partial restore onto the
  abstract model's shardings); the optimizer moments stay on disk.
  """
  step_dir = pathlib.Path(step_dir).absolute()
  cfg = model_config_of(step_dir)
  graphdef, abstract = abstract_model(cfg)
  flat = dict(nnx.to_flat_state(abstract))
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {p: one for p in flat}
  else:
    shardings = {p: s.get_value() for p, s in nnx.to_flat_state(state_shardings(abstract, mesh))}
  # `save` writes the TrainState as nested dicts with string keys and a {"value": array} per
  # nnx Variable: the restore target mirrors that layout for the params alone.
  key = lambda path: tuple(str(k) for k in path)
  target: dict = {}
  for path, var in flat.items():
    node = target
    for k in key(path)[:-1]:
      node = node.setdefault(k, {})
    sds = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[path])
    node[key(path)[-1]] = {"value": sds}
  item = {"params": target}
  args = ocp.args.PyTreeRestore(
    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
  )
  with ocp.PyTreeCheckpointer() as c:
    restored = c.restore(step_dir / "state", args=args)
  by_key = {key(p): p for p in flat}
  leaves = []
  for kp, x in jax.tree_util.tree_flatten_with_path(restored["params"])[0]:
    path = by_key[tuple(str(getattr(e, "key", e)) for e in kp)[:-1]]  # drop the "value" level
    leaves.append((path, flat[path].replace(x)))
  return cfg, nnx.merge(graphdef, nnx.from_flat_state(leaves))


def json_model_config(cfg: ModelConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d["eos_token_ids"] = list(d["eos_token_ids"])
  return d
