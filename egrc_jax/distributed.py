"""Multi-process start-up: call `maybe_initialize()` first, before any other JAX call.

Which case applies is read from the environment, so the same command runs everywhere:

- `EGRC_COORDINATOR=host:port`, `EGRC_NUM_PROCESSES=N`, `EGRC_PROCESS_ID=i`:
  `jax.distributed.initialize(coordinator_address, N, i)`. Set by `launch/local.sh` (N CPU
  processes on one machine), or by hand on any other cluster.
- `EGRC_DISTRIBUTED=auto`: `jax.distributed.initialize()` with no arguments; on a Cloud TPU
  pod JAX reads the coordinator, process count and ids from the TPU VM metadata. Set by
  `launch/tpu.sh run` on every worker.
- neither: one process, nothing to do.

`EGRC_SHUTDOWN_TIMEOUT_S=S` (optional, either multi-process case): how long a rank that ends
waits at JAX's shutdown barrier for the others (JAX's default: 300 s; then every rank
aborts). The multi-process tests raise it above the launcher's own timeout, so that a rank
that hangs is stopped by `launch/local.sh`, which prints its stacks first.

CPU collectives across processes (JAX 0.10.2): a CPU client only gets cross-process
collectives when `jax.distributed` is initialised *before* the CPU backend is created; then
`xla_bridge.make_cpu_client` builds them from `jax_cpu_collectives_implementation`, whose
default is "gloo" (`jax/_src/config.py`: DEFAULT_CPU_COLLECTIVES_IMPL; "mpi" needs an MPI
library). Gloo runs over TCP between the processes, bootstrapped through the coordinator's
key-value store. We set "gloo" explicitly anyway, so that a changed default cannot silently
give a client whose cross-process psum fails. The option only affects CPU clients; on TPU
the collectives are the ICI/DCN ones and it is ignored. Calling `maybe_initialize()` after
the backend exists raises JAX's own RuntimeError ("must be called before any JAX
computations").
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal

import jax

ENV_COORDINATOR = "EGRC_COORDINATOR"
ENV_NUM_PROCESSES = "EGRC_NUM_PROCESSES"
ENV_PROCESS_ID = "EGRC_PROCESS_ID"
ENV_AUTO = "EGRC_DISTRIBUTED"
ENV_SHUTDOWN_TIMEOUT = "EGRC_SHUTDOWN_TIMEOUT_S"
CPU_COLLECTIVES = "gloo"


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """Explicit coordinates of this process in a multi-process run."""

  coordinator: str  # host:port of process 0's coordination service
  num_processes: int
  process_id: int

  def __post_init__(self):
    host, sep, port = self.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(
        f"{ENV_COORDINATOR}={self.coordinator!r} must be host:port, e.g. localhost:12345"
      )
    if self.num_processes < 1:
      raise ValueError(f"{ENV_NUM_PROCESSES}={self.num_processes} must be >= 1")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(
        f"{ENV_PROCESS_ID}={self.process_id} must be in [0, {ENV_NUM_PROCESSES}="
        f"{self.num_processes})"
      )


def _int_env(env, name: str) -> int:
  value = env.get(name)
  if value is None or not value.strip().lstrip("-").isdigit():
    raise ValueError(
      f"{ENV_COORDINATOR} is set, so {name} must be an integer too (got {value!r}); set"
      f" {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together"
    )
  return int(value)


def spec_from_env(env=None) -> ProcessSpec | str | None:
  """A ProcessSpec for explicit coordinates, "auto" for a TPU pod, None for one process."""
  env = os.environ if env is None else env
  if env.get(ENV_COORDINATOR):
    return ProcessSpec(
      coordinator=env[ENV_COORDINATOR],
      num_processes=_int_env(env, ENV_NUM_PROCESSES),
      process_id=_int_env(env, ENV_PROCESS_ID),
    )
  mode = env.get(ENV_AUTO, "")
  if mode not in ("", "auto", "off"):
    raise ValueError(f"{ENV_AUTO}={mode!r}: use 'auto' (TPU pod), 'off' or leave it unset")
  return "auto" if mode == "auto" else None


def dump_stacks_on_sigusr1() -> None:
  """Print every thread's Python stack to stderr on SIGUSR1 (`launch/local.sh` sends it to a
  process it is about to stop, so a multi-process hang shows where each rank waited)."""
  if hasattr(signal, "SIGUSR1"):
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def shutdown_timeout(env) -> int:
  """EGRC_SHUTDOWN_TIMEOUT_S as a positive number of seconds (ValueError naming the fix)."""
  value = env.get(ENV_SHUTDOWN_TIMEOUT, "").strip()
  if not value.isdigit() or int(value) < 1:
    raise ValueError(
      f"{ENV_SHUTDOWN_TIMEOUT}={value!r} must be a whole number of seconds >= 1, or unset "
      "(JAX's default: 300)"
    )
  return int(value)


def maybe_initialize(env=None) -> bool:
  """Initialise jax.distributed when the environment asks for it; True if it did (or had)."""
  if jax.distributed.is_initialized():
    return True
  spec = spec_from_env(env)
  if spec is None:
    return False
  dump_stacks_on_sigusr1()
  extra = {}
  env = os.environ if env is None else env
  if env.get(ENV_SHUTDOWN_TIMEOUT):
    extra["shutdown_timeout_seconds"] = shutdown_timeout(env)
  jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
  if spec == "auto":
    jax.distributed.initialize(**extra)
  else:
    jax.distributed.initialize(
      coordinator_address=spec.coordinator,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      **extra,
    )
  return True
