"""The device mesh, sharded model creation, and the two parameter layouts.

One mesh with axes ("data", "fsdp", "tensor"): batch rows are split over data x fsdp,
parameters over fsdp (their "embed" dimension) and tensor (heads, MLP width, vocab). The
logical-axis rules table lives in `egrc_jax.model.logical.RULES`.

Two layouts of the same parameters:
  * training (`state_shardings`, RULES): "embed" over fsdp -- the state is split 1/fsdp;
  * sampling (`sampling_shardings`, SAMPLING_RULES): no fsdp, only tensor splits. Decode
    reads every weight once per token; in the training layout each of the C decode steps
    all-gathers the whole model again. `to_sampling_layout` copies the params once per
    rollout (cast to the compute dtype) into this layout instead.

Sharded initialisation goes through `nnx.eval_shape`, so a 7B model's parameters are only
ever created already split across the devices (each device materialises its own shard).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from egrc_jax.model import ModelConfig, Transformer
from egrc_jax.model.logical import RULES, logical_to_spec

MESH_AXES = ("data", "fsdp", "tensor")
# The sampling layout's rules: RULES with "embed" replicated (no FSDP for the decode weights).
SAMPLING_RULES = tuple((name, None if name == "embed" else axis) for name, axis in RULES)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh shape data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)}"
      f" devices, but {len(devices)} are available; set mesh.* so the product matches"
    )
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def variable_spec(var: nnx.Variable, mesh: Mesh, rules=RULES) -> P:
  names = var.get_metadata().get("out_sharding")
  if not names:
    return P()
  return logical_to_spec(names, var.shape, mesh, rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
  """NamedSharding for every Variable of an (abstract or concrete) nnx state."""
  return jax.tree.map(
    lambda v: v.replace(NamedSharding(mesh, variable_spec(v, mesh, rules))),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def sampling_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding of every Variable in the sampling layout: replicated over data and fsdp,
  heads / kv heads / MLP width / vocab over tensor where the tensor axis divides them."""
  return state_shardings(state, mesh, SAMPLING_RULES)


def keeps_param_dtype(path) -> bool:
  """True for the leaves the model uses in their own dtype: RMSNorm scales multiply the
  normalised activations in param dtype (`RMSNorm.__call__`); every other weight is cast
  to the compute dtype before use, so casting it beforehand changes no result."""
  return any(getattr(k, "key", getattr(k, "name", None)) == "scale" for k in path)


def sampling_dtype(path, dtype, compute_dtype) -> jnp.dtype:
  """The dtype a parameter leaf has in the sampling layout."""
  dtype, compute = jnp.dtype(dtype), jnp.dtype(compute_dtype)
  if keeps_param_dtype(path) or not jnp.issubdtype(dtype, jnp.floating):
    return dtype
  return compute if compute.itemsize < dtype.itemsize else dtype  # narrow, never widen


def _cast_for_sampling(state, compute_dtype):
  return jax.tree_util.tree_map_with_path(
    lambda p, x: x.astype(sampling_dtype(p, x.dtype, compute_dtype)), state
  )


_LAYOUT_FNS: dict = {}


def sampling_layout_fn(shardings: nnx.State, compute_dtype) -> Callable[[nnx.State], nnx.State]:
  """The jitted copy `state -> state in the sampling layout` (cast + reshard in one
  program), cached per layout so each rollout reuses one compiled copy."""
  leaves, treedef = jax.tree.flatten(shardings)
  key = (treedef, tuple(leaves), jnp.dtype(compute_dtype).name)
  if key not in _LAYOUT_FNS:
    cast = functools.partial(_cast_for_sampling, compute_dtype=jnp.dtype(compute_dtype))
    _LAYOUT_FNS[key] = jax.jit(cast, out_shardings=shardings)
  return _LAYOUT_FNS[key]


def to_sampling_layout(state: nnx.State, mesh: Mesh, compute_dtype) -> nnx.State:
  """A copy of `state` in the sampling layout, floating weights in `compute_dtype` (norm
  scales keep theirs). Costs one gather of the model; the decode loop then gathers none."""
  return sampling_layout_fn(sampling_shardings(state, mesh), compute_dtype)(state)


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules=RULES) -> nnx.Module:
  """Build the module returned by `make()` with every parameter created sharded."""
  abstract = nnx.eval_shape(make)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init():
    return nnx.state(make())

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def init_model(cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0) -> Transformer:
  """A randomly initialised model, sharded over `mesh` when given."""
  make = lambda: Transformer(cfg, nnx.Rngs(params=seed))
  if mesh is None:
    return make()
  return create_sharded(make, mesh)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Shapes and dtypes of every parameter, without allocating anything."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))))


def shard_state(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
  """Place an existing state on the mesh according to its logical axis names."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over data x fsdp, every other dimension replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def count_params(state: nnx.State) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


# -- host <-> global arrays (one process or many) ------------------------------------------
#
# Multi-host convention: every process holds the same host value of the small per-step
# arrays (prompts, the learner's batch); `jax.device_put` of that value with a global
# sharding gives each process its own devices' slices. Results come back with `to_host`,
# which gathers across processes when an array spans several.


def to_host(tree):
  """Numpy copies of every array of `tree`, gathered from all processes when needed."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def process_rows(n: int) -> slice:
  """The contiguous rows [i n/p, (i+1) n/p) that process i handles on the host."""
  p, i = jax.process_count(), jax.process_index()
  if n % p:
    raise ValueError(f"{n} rows do not split evenly over {p} processes")
  return slice(i * n // p, (i + 1) * n // p)


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Concatenate every process's `local` rows in process order (identity for one process)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(local, tiled=True))
