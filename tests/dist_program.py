"""A tiny multi-process JAX program for tests/test_launch.py (not collected by pytest).

Run by `launch/local.sh --num_processes=2 --devices_per_process=4 -- python tests/dist_program.py`:
initialises jax.distributed from the EGRC_* variables, builds one (data=2, fsdp=4) mesh over
all 8 devices of both processes and checks two cross-process reductions:
  - a jitted global sum of an array whose rows live on different processes;
  - a shard_map psum over both mesh axes, every device contributing its global index.
Prints one "OK" line per process; any mismatch raises (non-zero exit).
"""

import sys

import jax  # noqa: I001 -- JAX_PLATFORMS/XLA_FLAGS come from the launcher's environment

from egrc_jax import distributed

distributed.maybe_initialize()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from egrc_jax.sharding import make_mesh  # noqa: E402


def main() -> int:
  n_proc, rank = jax.process_count(), jax.process_index()
  assert n_proc == 2, f"expected 2 processes, got {n_proc}"
  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  assert jax.config.jax_cpu_collectives_implementation == "gloo"
  mesh = make_mesh(data=2, fsdp=4, tensor=1)  # all 8 global devices
  rows = NamedSharding(mesh, P(("data", "fsdp")))

  # Global array [16]: process r holds the 8 values 8r .. 8r+7 (2 per local device).
  local = np.arange(8, dtype=np.float32) + 8 * rank
  x = jax.make_array_from_process_local_data(rows, local, (16,))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  assert float(total) == sum(range(16)), float(total)

  # psum over both axes: device d of the (data, fsdp) grid contributes d; all see 0+..+7.
  ids = jax.make_array_from_process_local_data(
    rows, np.arange(4, dtype=np.float32) + 4 * rank, (8,)
  )
  psum = jax.shard_map(
    lambda v: jax.lax.psum(v, ("data", "fsdp")),
    mesh=mesh,
    in_specs=P(("data", "fsdp")),
    out_specs=P(("data", "fsdp")),
  )(ids)
  got = [float(s.data[0]) for s in psum.addressable_shards]
  assert got == [28.0] * 4, got
  print(
    f"OK rank={rank} processes={n_proc} devices={jax.device_count()} sum={float(total)}"
    f" psum={got[0]}",
    flush=True,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
