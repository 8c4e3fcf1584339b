"""Logical axis names -> mesh axes: the one rules table and the activation constraint.

Parameters and activations are annotated with logical names ("embed", "heads", ...);
`RULES` says which mesh axis (or none) each name is laid along. Kept here, below `model`,
so the model can constrain activations without knowing anything about meshes in config.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

# logical name -> mesh axis (a str, a tuple of str, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("norm", None),
  ("cache_length", None),
)


def _axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  axes = (axis,) if isinstance(axis, str) else axis
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def logical_to_spec(names: Sequence[str | None], shape=None, mesh=None, rules=RULES) -> P:
  """PartitionSpec for logical `names`. With `shape` and `mesh`, a dimension that the mesh
  axis does not divide is replicated instead (e.g. 2 kv heads on a tensor axis of 4): the
  standard GQA fallback, not an error. A mesh axis is used at most once per array."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axis = table.get(name) if name is not None else None
    if axis is not None and mesh is not None:
      axes = (axis,) if isinstance(axis, str) else tuple(axis)
      axes = tuple(a for a in axes if a in mesh.shape and a not in used)
      axis = axes if len(axes) > 1 else (axes[0] if axes else None)
      if axis is not None and shape is not None and shape[i] % _axis_size(mesh, axis):
        axis = None
    if axis is not None:
      used.update((axis,) if isinstance(axis, str) else axis)
    spec.append(axis)
  return P(*spec)


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrain an activation to its logical sharding under the current mesh (`jax.set_mesh`).

  Outside any mesh (one device) there is nothing to constrain and `x` is returned as is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
