#!/usr/bin/env bash
# The half of launch/tpu.sh that runs ON each TPU VM worker (it arrives with the repo copy).
# Jobs run detached (setsid + nohup), so a dropped ssh connection from your laptop does not
# kill a multi-day run; `follow` re-attaches to the log at any time.
#
# usage: launch/remote.sh setup [--dry-run]        python 3.11 venv + pip install -e .[tpu]
#        launch/remote.sh start RUN_ID -- CMD...    start CMD detached, log to $LOG_ROOT/RUN_ID
#        launch/remote.sh follow RUN_ID             stream the log until CMD ends; exit with its status
#        launch/remote.sh status RUN_ID             running | exited N | never started
#        launch/remote.sh stop RUN_ID               SIGTERM the job's process group
# env:   EGRC_LOG_DIR (default ~/egrc_logs), EGRC_VENV (default ~/egrc_venv),
#        EGRC_PYTHON (default python3.11), EGRC_POLL_S (default 5)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_ROOT="${EGRC_LOG_DIR:-$HOME/egrc_logs}"
VENV="${EGRC_VENV:-$HOME/egrc_venv}"
PY="${EGRC_PYTHON:-python3.11}"
POLL_S="${EGRC_POLL_S:-5}"

usage() {  # the header comment, without its '# '
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}
die() { echo "remote.sh: $*" >&2; exit 2; }

run_dir() {
  [[ -n "${1:-}" ]] || die "missing RUN_ID (see --help)"
  [[ "$1" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_ID '$1' may only contain letters, digits, . _ -"
  echo "$LOG_ROOT/$1"
}

is_running() {  # $1 = run dir
  [[ -f "$1/pid" ]] && [[ ! -f "$1/rc" ]] && kill -0 "$(cat "$1/pid")" 2>/dev/null
}

cmd_setup() {
  local dry=0
  [[ "${1:-}" == "--dry-run" ]] && dry=1
  local steps=()
  if ! command -v "$PY" >/dev/null; then
    # TPU VM images ship Ubuntu 22.04 with python 3.10; the package needs >= 3.11.
    steps+=("sudo apt-get update -q"
            "sudo apt-get install -y -q software-properties-common"
            "sudo add-apt-repository -y ppa:deadsnakes/ppa"
            "sudo apt-get install -y -q python3.11 python3.11-venv")
  fi
  steps+=("$PY -m venv $VENV"
          "$VENV/bin/pip install -q --upgrade pip"
          "$VENV/bin/pip install -q -e '${REPO}[tpu]'")
  local s
  for s in "${steps[@]}"; do
    echo "+ $s"
    if (( ! dry )); then bash -c "$s"; fi
  done
}

cmd_start() {
  local dir
  dir="$(run_dir "${1:-}")"
  shift
  [[ "${1:-}" == "--" ]] || die "start: put the command after --"
  shift
  (( $# )) || die "start: empty command"
  if is_running "$dir"; then
    die "run '$(basename "$dir")' is already running (pid $(cat "$dir/pid")); follow or stop it"
  fi
  mkdir -p "$dir"
  rm -f "$dir/rc"
  echo "=== $(date -u +%FT%TZ) start on $(hostname): $*" >> "$dir/log"
  # $0 inside bash -c is the run dir; the job's exit status lands in $dir/rc when it ends.
  # shellcheck disable=SC2016  # single quotes: expanded by the inner bash, not here
  nohup setsid bash -c 'cd "$1" && shift && status=0 && "$@" || status=$?; echo "$status" > "$0/rc"' \
    "$dir" "$REPO" "$@" >> "$dir/log" 2>&1 < /dev/null &
  echo "$!" > "$dir/pid"
  echo "started run '$(basename "$dir")' on $(hostname) (pid $!), log $dir/log"
}

cmd_follow() {
  local dir
  dir="$(run_dir "${1:-}")"
  [[ -f "$dir/log" ]] || die "no log at $dir/log: run '$1' was never started here"
  tail -n +1 -F "$dir/log" 2>/dev/null &
  local tail_pid=$!
  while [[ ! -f "$dir/rc" ]]; do
    if ! is_running "$dir" && [[ ! -f "$dir/rc" ]]; then
      echo "1" > "$dir/rc"  # died without writing its status (killed, OOM, reboot)
      echo "=== job process is gone without an exit status; recording 1" >> "$dir/log"
    fi
    sleep "$POLL_S"
  done
  sleep 1  # let tail print the last lines
  kill "$tail_pid" 2>/dev/null || true
  wait "$tail_pid" 2>/dev/null || true
  return "$(cat "$dir/rc")"
}

cmd_status() {
  local dir
  dir="$(run_dir "${1:-}")"
  if is_running "$dir"; then echo "$(hostname): running (pid $(cat "$dir/pid"))"
  elif [[ -f "$dir/rc" ]]; then echo "$(hostname): exited $(cat "$dir/rc")"
  else echo "$(hostname): never started"; fi
}

cmd_stop() {
  local dir
  dir="$(run_dir "${1:-}")"
  if is_running "$dir"; then
    kill -TERM -- "-$(cat "$dir/pid")"  # the job's own process group (setsid)
    echo "$(hostname): sent SIGTERM to run '$1'"
  else
    echo "$(hostname): run '$1' is not running"
  fi
}

main() {
  local sub="${1:-}"
  shift || true
  case "$sub" in
    setup) cmd_setup "$@" ;;
    start) cmd_start "$@" ;;
    follow) cmd_follow "$@" ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    -h|--help|help|"") usage ;;
    *) die "unknown subcommand '$sub' (see --help)" ;;
  esac
}

main "$@"
