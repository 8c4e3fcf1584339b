"""The continuous and lock-step decode programs compiled for a TPU topology on this host.

  python -m egrc_jax.bench.continuous_tpu --topology v4:2x2x4 --mesh 1,16,1 \\
      --preset r1_distill_1p5b --prompts 128 --samples 8 --prompt-len 1024 --max-new 8192 \\
      --slots 256 --out /tmp/continuous_tpu.json

Needs libtpu (`pip install "jax[tpu]"`); no TPU: libtpu's compiler runs on the CPU host for
a named topology. For each loop, the compiler's memory per chip of the prefill and the
decode loop (arguments + outputs + temporaries - aliased), and the bytes accessed by one
decode step (`decode_step`, the loop body alone: cost analysis counts a while body once).
The paged kernel is a custom call, so the compiler charges a step with its whole operands
(the full page pool); `kv_read_bytes_per_step` gives what the kernel reads: the filled
pages, sum_b ceil((len_p + t_b) / Pg) Pg tokens, at the mean fill t = C / 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v4:2x2x4 (v4-32)")
  p.add_argument(
    "--chip-config", default="megacore", help="libtpu chip config: v4 / v5p chips as one device"
  )
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1: the rest)")
  p.add_argument("--preset", default="r1_distill_1p5b")
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--samples", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=1024)
  p.add_argument("--max-new", type=int, default=8192)
  p.add_argument("--slots", type=int, default=64)
  p.add_argument("--page-size", type=int, default=64)
  p.add_argument("--shrink-levels", type=int, default=0, help="levels compile one body each")
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--skip-lockstep", action="store_true")
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {
    "argument_bytes": m.argument_size_in_bytes,
    "output_bytes": m.output_size_in_bytes,
    "alias_bytes": m.alias_size_in_bytes,
    "temp_bytes": m.temp_size_in_bytes,
  }
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
  out["total_bytes"] += out["temp_bytes"]
  return out


def bytes_accessed(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("bytes accessed", 0.0))


def compile_all(programs: dict, mesh) -> dict:
  import jax

  out = {}
  for name, prog in programs.items():
    t = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = prog.lower().compile()
    out[name] = memory(compiled) | {"compile_s": time.perf_counter() - t}
    if name == "decode_step":
      out[name]["bytes_accessed"] = bytes_accessed(compiled)
    print(name, out[name], file=sys.stderr, flush=True)
  return out


def main(argv=None) -> dict:
  a = _args(argv)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # read when libtpu initialises
  import jax
  import numpy as np
  from jax.experimental import topologies

  from egrc_jax.model import get_preset
  from egrc_jax.sampler import SamplingConfig
  from egrc_jax.sampler.layouts import kv_layout_bytes
  from egrc_jax.sampler.programs import abstract_state, continuous_programs, lockstep_programs

  kw = {} if a.topology.startswith("v5e") else {"chip_config_name": a.chip_config}
  topo = topologies.get_topology_desc(platform="tpu", topology_name=a.topology, **kw)
  devices = np.array(topo.devices)
  shape = [int(x) for x in a.mesh.split(",")]
  if -1 in shape:
    shape[shape.index(-1)] = devices.size // int(np.prod([s for s in shape if s != -1]))
  mesh = jax.sharding.Mesh(devices.reshape(shape), ("data", "fsdp", "tensor"))
  mcfg = get_preset(a.preset)
  graphdef, state = abstract_state(mcfg, mesh)
  cfg = SamplingConfig(
    temperature=a.temperature,
    top_p=a.top_p,
    max_new_tokens=a.max_new,
    prompt_buckets=(a.prompt_len,),
    num_slots=a.slots,
    page_size=a.page_size,
    shrink_levels=a.shrink_levels,
    kv_layout="paged",
  )
  size = dict(num_prompts=a.prompts, num_samples=a.samples, prompt_len=a.prompt_len)
  chips, D = devices.size, shape[0] * shape[1]
  per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * mcfg.jnp_dtype.itemsize
  B, S = a.prompts * a.samples, a.prompt_len + a.max_new
  copies = 1 if a.prompts % D == 0 and a.slots % D == 0 else D  # `prompt_shards`
  kv = kv_layout_bytes(mcfg, cfg, a.prompts, a.prompt_len, a.slots, "paged", copies)
  Pg = a.page_size
  filled = -(-(a.prompt_len + a.max_new // 2) // Pg) * Pg
  result = {
    "config": vars(a) | {"chips": chips, "mesh_shape": shape},
    "analytic": {
      "lockstep_kv_bytes_per_chip": per_token * B * S / chips,
      "continuous_kv_bytes_per_chip": (kv["prompt"] + kv["completion"]) / chips,
      "lockstep_kv_read_bytes_per_step_per_chip": per_token * B * S / chips,
      "continuous_kv_read_bytes_per_step_per_chip": per_token * a.slots * filled / chips,
    },
  }
  result["continuous"] = compile_all(
    continuous_programs(graphdef, state, cfg, **size, mesh=mesh), mesh
  )
  if not a.skip_lockstep:
    result["lockstep"] = compile_all(
      lockstep_programs(graphdef, state, cfg, **size, mesh=mesh), mesh
    )
  gib = lambda x: f"{x / 2**30:.2f} GiB"
  for loop in ("lockstep", "continuous"):
    for name, row in result.get(loop, {}).items():
      extra = (
        f", step bytes accessed {gib(row['bytes_accessed'])}" if "bytes_accessed" in row else ""
      )
      print(
        f"{loop:10} {name:12} per chip {gib(row['total_bytes'])} "
        f"(temp {gib(row['temp_bytes'])}){extra}"
      )
  for k, v in result["analytic"].items():
    print(f"{k}: {gib(v)}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
