"""Row layouts: padded rows (a mask) and packed rows (segment ids), and their positions.

Shape letters: B rows, T slots. Segment id 0 marks padding; 1, 2, ... number the sequences
packed into a row (each a contiguous run). A padded row is a packed row of one sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
  """Position ids for a padded batch: the count of real tokens before each slot (0 on pads)."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1, 0)


def segment_ids(mask_BT, segment_ids_BT) -> jax.Array:
  """int32 segment ids [B, T] from exactly one of a padding mask (True -> 1, pad -> 0) or
  the segment ids themselves."""
  if (mask_BT is None) == (segment_ids_BT is None):
    raise ValueError(
      "give exactly one of mask_BT (padded rows) and segment_ids_BT (packed rows: 0 on "
      f"pads, 1, 2, ... per sequence); got mask_BT={mask_BT is not None}, "
      f"segment_ids_BT={segment_ids_BT is not None}"
    )
  if segment_ids_BT is None:
    return mask_BT.astype(jnp.int32)
  return segment_ids_BT.astype(jnp.int32)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
  """Position ids for packed rows: the slot's offset from the start of its run of equal
  segment ids (each packed sequence restarts at 0); 0 on pads (id 0)."""
  seg = segment_ids_BT.astype(jnp.int32)
  T = seg.shape[1]
  t_T = jnp.arange(T, dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run_start_BT = jax.lax.cummax(jnp.where(starts, t_T, 0), axis=1)
  return jnp.where(seg != 0, t_T - run_start_BT, 0)
