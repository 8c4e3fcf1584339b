"""Per-device memory plan of an EGRC run, from shapes alone (no devices, no allocation).

    python -m egrc_jax.plan --preset=r1_distill_1p5b --chip=v4 --num_chips=16 \
      --mesh=data:1,fsdp:16,tensor:1 --rollout_batch=512 --max_prompt=1024 \
      --max_new_tokens=8192 --micro_batch=16 --remat=full [--json=plan.json]

    python -m egrc_jax.plan --config=configs/r1_distill_1p5b.py --topology=v4-32 --compile

`plan_memory(model_cfg, mesh_shape, chip, ...)` is the API a trainer config feeds;
`settings.py` holds the chip table, `PlanSettings` and `MemoryPlan`; `memory.py` the terms and
their formulas; `cli.py` the command line. Ahead-of-time compilation for a named TPU slice
(the `[aot]` extra): `topology.py` (slice names, libtpu's compile-only devices, chip peaks),
`programs.py` (every program of a run from abstract shapes), `aot.py` (compile and report),
`hlo.py` (the decode loop's collectives), `compare.py` (formula against compiler).
docs/memory_plan.md has the figures for the real models.
"""

from egrc_jax.plan.memory import kv_cache_bytes, param_elements_per_device, plan_memory
from egrc_jax.plan.settings import CHIP_HBM_GIB, GIB, MemoryPlan, PlanSettings, Term

__all__ = [
  "CHIP_HBM_GIB",
  "GIB",
  "MemoryPlan",
  "PlanSettings",
  "Term",
  "kv_cache_bytes",
  "param_elements_per_device",
  "plan_memory",
]
