"""Start N CPU processes of one command on this machine, wired like hosts of a pod.

    python -m egrc_jax.launch_local --num_processes=2 --devices_per_process=4 -- \
      python -m egrc_jax.main --config=configs/toy.py --workdir=/tmp/run

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K and
EGRC_COORDINATOR / EGRC_NUM_PROCESSES / EGRC_PROCESS_ID, which
`egrc_jax.distributed.maybe_initialize()` turns into `jax.distributed.initialize(...)`.
Output lines are prefixed with the rank ("[1] ..."). When one process fails the others are
terminated (they would otherwise wait on it in a collective until JAX's heartbeat timeout),
and the exit status is the first failure's. This module never imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from egrc_jax import cli

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class LocalLaunch:
  command: tuple[str, ...]  # argv run by every process
  num_processes: int = 2
  devices_per_process: int = 4
  port: int = 0  # coordinator port on localhost; 0 picks a free one
  timeout_s: float = 0  # kill everything after this long; 0 means no limit

  def __post_init__(self):
    if not self.command:
      raise ValueError("no command given: put it after --, e.g. -- python my_script.py")
    if self.num_processes < 1 or self.devices_per_process < 1:
      raise ValueError(
        f"num_processes={self.num_processes} and devices_per_process="
        f"{self.devices_per_process} must both be >= 1"
      )
    if not 0 <= self.port < 65536:
      raise ValueError(f"port={self.port} must be in [0, 65535]")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict, launch: LocalLaunch, port: int, rank: int) -> dict:
  """The environment of process `rank`: CPU platform, K devices, coordinates."""
  flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  flags.append(f"{DEVICE_COUNT_FLAG}={launch.devices_per_process}")
  return {
    **base,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": " ".join(flags),
    "EGRC_COORDINATOR": f"localhost:{port}",
    "EGRC_NUM_PROCESSES": str(launch.num_processes),
    "EGRC_PROCESS_ID": str(rank),
    "PYTHONUNBUFFERED": "1",
  }


def _pump(rank: int, stream, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
      out.flush()
  stream.close()


def run(launch: LocalLaunch, out=None, poll_s: float = 0.1) -> int:
  """Run every process to completion; 0 if all succeeded, else the first failure's code."""
  out = out or sys.stdout
  port = launch.port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for rank in range(launch.num_processes):
    p = subprocess.Popen(
      launch.command,
      env=process_env(dict(os.environ), launch, port, rank),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,  # its own process group, so we can stop its children too
    )
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(rank, p.stdout, out, lock), daemon=True))
    pumps[-1].start()
  start, status = time.monotonic(), 0
  while [p.poll() for p in procs].count(None):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    timed_out = launch.timeout_s and time.monotonic() - start > launch.timeout_s
    if failed or timed_out:
      status = failed[0] if failed else 124
      with lock:
        why = f"exit status {status}" if failed else f"timeout {launch.timeout_s}s"
        out.write(f"[launch] stopping the remaining processes ({why})\n")
      _stop(procs)
      break
    time.sleep(poll_s)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode), 0)
  # A process killed by a signal has a negative return code; shells report 128 + signal.
  return status if status >= 0 else 128 - status


def _stop(procs, grace_s: float = 5.0, dump_s: float = 2.0) -> None:
  """Stop the processes still running: SIGUSR1 first (a Python process of ours prints every
  thread's stack on it, `egrc_jax.distributed.dump_stacks_on_sigusr1`, so a hang says where),
  then SIGTERM, then SIGKILL after grace_s."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    _signal(p, signal.SIGUSR1)
  if running:
    time.sleep(dump_s)
  for p in procs:
    if p.poll() is None:
      _signal(p, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal(p, signal.SIGKILL)


def _signal(p, sig) -> None:
  try:
    os.killpg(p.pid, sig)
  except ProcessLookupError:  # it ended in between
    pass


def dry_run_lines(launch: LocalLaunch) -> list[str]:
  port = launch.port or "<free port>"
  keys = ("JAX_PLATFORMS", "XLA_FLAGS", "EGRC_COORDINATOR", "EGRC_NUM_PROCESSES", "EGRC_PROCESS_ID")
  lines = []
  for rank in range(launch.num_processes):
    env = process_env({}, launch, port, rank)
    assign = " ".join(f"{k}={shlex.quote(env[k])}" for k in keys)
    lines.append(f"[{rank}] {assign} {shlex.join(launch.command)}")
  return lines


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  command = []
  if "--" in argv:
    command = argv[argv.index("--") + 1 :]
    argv = argv[: argv.index("--")]
  p = cli.Parser(prog="launch/local.sh", description=__doc__.split("\n")[0])
  p.add_argument("--num_processes", "--num-processes", type=int, default=2)
  p.add_argument("--devices_per_process", "--devices-per-process", type=int, default=4)
  p.add_argument("--port", type=int, default=0, help="coordinator port; 0 picks a free one")
  p.add_argument("--timeout", type=float, default=0, help="seconds; 0 means no limit")
  p.add_argument("--dry_run", "--dry-run", action="store_true", help="print, do not run")
  p.epilog = "The command to run goes after --."
  args = p.parse_args(argv)
  try:
    launch = LocalLaunch(
      tuple(command), args.num_processes, args.devices_per_process, args.port, args.timeout
    )
  except ValueError as e:
    p.error(str(e))
  if args.dry_run:
    print("\n".join(dry_run_lines(launch)))
    return 0
  return run(launch)


if __name__ == "__main__":
  sys.exit(cli.run(main))
