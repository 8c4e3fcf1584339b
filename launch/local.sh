#!/usr/bin/env bash
# N CPU processes of one command on this machine, wired like the hosts of a TPU pod.
#
# usage: launch/local.sh [--num_processes=N] [--devices_per_process=K] [--port=P]
#                        [--timeout=S] [--dry-run] -- COMMAND...
# example: launch/local.sh --num_processes=2 --devices_per_process=4 -- \
#            python -m egrc_jax.main --config=configs/toy.py --workdir=/tmp/egrc_2proc
#
# Each process runs with JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K
# and EGRC_COORDINATOR=localhost:P, EGRC_NUM_PROCESSES=N, EGRC_PROCESS_ID=i, which
# egrc_jax.distributed.maybe_initialize() turns into jax.distributed.initialize(...).
# Output lines carry the rank ("[1] ..."); the exit status is the first failure's (the
# other processes are then stopped). --dry-run prints each process's environment and command.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    exit 0 ;;
esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m egrc_jax.launch_local "$@"
