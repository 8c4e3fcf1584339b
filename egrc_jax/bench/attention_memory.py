"""Compiled TPU memory of attention and of the learner's gradient, from a CPU host.

  python -m egrc_jax.bench.attention_memory                       # attention alone: seconds
  python -m egrc_jax.bench.attention_memory --learner --impls dense,auto   # ~8 min each here

Needs libtpu (installed with jax[tpu]), not a TPU: `jax.experimental.topologies` gives the
devices of a named topology to compile for ahead of time. Printed: XLA's temporaries per
device (`memory_analysis().temp_size_in_bytes`) for
  * attention alone, forward+backward of one row of T = prompt + completion slots at the
    1.5B shapes (12 heads, 2 kv heads, head_dim 128, bfloat16), on one device;
  * with --learner: `jax.grad` of the learner's completion log-probs + entropy (remat on,
    vocab-chunked) for preset r1_distill_1p5b, --rows rows over a data 1 x fsdp --devices
    mesh. This is the gradient alone (no optimizer update, no micro-batch scan).
`auto` inside the mesh resolves to splash (the mesh's devices are TPUs).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from egrc_jax.model import attention, get_preset
from egrc_jax.sharding import MESH_AXES, abstract_model, state_shardings
from egrc_jax.train import Batch, completion_logprobs

GIB = 2**30


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--topology", default="v4:2x2x4")
  p.add_argument("--devices", type=int, default=16, help="devices of the learner's mesh")
  p.add_argument("--rows", type=int, default=16, help="learner rows (one micro-batch)")
  p.add_argument("--prompt", type=int, default=1024)
  p.add_argument("--completion", type=int, default=8192)
  p.add_argument("--impls", default="dense,splash,blocked")
  p.add_argument("--learner", action="store_true", help="also compile the 1.5B gradient")
  return p.parse_args(argv)


def attention_temp_bytes(device, T: int, impl: str) -> int:
  sds = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=SingleDeviceSharding(device))
  q, kv, seg = (
    sds((1, T, 12, 128), jnp.bfloat16),
    sds((1, T, 2, 128), jnp.bfloat16),
    sds((1, T), jnp.int32),
  )
  loss = lambda q, k, v, s: jnp.sum(attention.attend(q, k, v, s, impl=impl).astype(jnp.float32))
  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, seg).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def learner_temp_bytes(devices, rows: int, Tp: int, C: int, impl: str) -> int:
  mesh = jax.sharding.Mesh(
    np.array(devices).reshape(1, len(devices), 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3
  )
  graphdef, abstract = abstract_model(get_preset("r1_distill_1p5b", attention_impl=impl))
  params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    state_shardings(abstract, mesh),
  )
  rows_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rows_sharding)
  S = Tp + C
  batch = Batch(
    sds((rows, S), jnp.int32),
    sds((rows, S), bool),
    sds((rows, S), jnp.int32),
    sds((rows, C), jnp.int32),
    *(sds((rows, C), jnp.float32) for _ in range(5)),
  )

  def loss(p, b):
    logp, ent = completion_logprobs(p, graphdef, b, 1.0, 8192, True)
    return jnp.sum(logp) + jnp.sum(ent)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss)).lower(params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None):
  a = _args(argv)
  from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu)

  devices = topologies.get_topology_desc(a.topology, "tpu").devices
  T = a.prompt + a.completion
  print(f"{a.topology}: {len(devices)} devices ({devices[0].device_kind})")
  for impl in a.impls.split(","):
    if impl == "auto":
      continue  # no mesh here: auto would follow this host's backend
    t = time.time()
    temp = attention_temp_bytes(devices[0], T, impl)
    print(f"attention fwd+bwd, 1 row, T={T}, {impl}: temp {temp / GIB:.2f} GiB "
          f"(compile {time.time() - t:.0f} s)", flush=True)  # fmt: skip
  if a.learner:
    for impl in a.impls.split(","):
      t = time.time()
      temp = learner_temp_bytes(devices[: a.devices], a.rows, a.prompt, a.completion, impl)
      print(f"1.5B learner gradient, {a.rows} rows over {a.devices} devices, S={T}, {impl}: "
            f"temp {temp / GIB:.2f} GiB/device (compile {time.time() - t:.0f} s)",
            flush=True)  # fmt: skip


if __name__ == "__main__":
  main()
