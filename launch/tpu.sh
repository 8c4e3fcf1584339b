#!/usr/bin/env bash
# Cloud TPU VM slices for egrc_jax: create, set up, run, resume after preemption, logs, delete.
#
# usage: launch/tpu.sh SUBCOMMAND [flags] [-- extra trainer flags]
#   create   create the slice, or reuse it when it is already READY
#   setup    copy this checkout (or --git URL) and the data to every worker; pip install -e .[tpu]
#   run      start `python -m egrc_jax.main --config=C --workdir=W` on all workers (detached),
#            then follow: each worker's log streams to runs/tpu/NAME/RUN/worker-I.log
#   resume   run the same command again; the trainer resumes from W's latest checkpoint.
#            --loop: until it succeeds, recreating (create + setup) the slice after preemption
#   logs     re-attach: follow every worker's log again (worker 0 also on stdout)
#   status   the slice's state and the job's state on every worker
#   stop     SIGTERM the job on every worker
#   delete   delete the slice (and its queued resource with --queued)
# flags (environment defaults in brackets):
#   --name NAME        TPU name [TPU_NAME, default egrc]
#   --zone ZONE        e.g. us-central2-b (v4), us-west4-a (v5e) [TPU_ZONE; required]
#   --project ID       GCP project [TPU_PROJECT; default: gcloud's configured project]
#   --type TYPE        v4-32 | v5litepod-64 | v5p-32 | v6e-64 ... [TPU_TYPE, default v4-32]
#   --version V        runtime [default by type: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
#                      v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
#   --spot | --preemptible   cheaper capacity that can be preempted (pair with resume --loop)
#   --queued           create through `queued-resources create` and wait for capacity
#   --workers N        hosts in the slice [default from --type]
#   --git URL          setup clones URL (--ref REF checks it out) instead of copying this tree
#   --data DIR         data copied to ~/shared/data [default ../shared/data if present; none]
#   --config SPEC      configs/<file>.py[:overrides]     (run, resume)
#   --workdir DIR      gs://bucket/path, checkpoints and metrics (run, resume)
#   --run-id ID        the job's name on the workers [default: last part of --workdir]
#   --loop             resume until success; --max-attempts N [50], --retry-wait S [120]
#   --retry-failures   with --loop, also retry failures on a healthy (READY) slice
#   --dry-run          print every command (gcloud, tar) instead of running it
#   local logs go to $TPU_LOG_DIR/NAME/RUN [default runs/tpu in the repo]
#   -h, --help
# example: launch/tpu.sh run --zone=us-central2-b --type=v4-32 --workdir=gs://my-bucket/egrc/r1 \
#            --config=configs/r1_distill_1p5b.py:model.hf_path=/ckpt/r1_distill_1p5b
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2016  # expanded by the worker's shell, not here
REMOTE_PY='$HOME/egrc_venv/bin/python'
REMOTE_SH="bash egrc_jax/launch/remote.sh"

NAME="${TPU_NAME:-egrc}" ZONE="${TPU_ZONE:-}" PROJECT="${TPU_PROJECT:-}" TYPE="${TPU_TYPE:-v4-32}"
VERSION="" CAPACITY="" QUEUED=0 WORKERS="" GIT="" REF="" DATA="" CONFIG="" WORKDIR="" RUN_ID=""
LOOP=0 MAX_ATTEMPTS=50 RETRY_WAIT=120 RETRY_FAILURES=0 DRY_RUN=0 CREATED=0
EXTRA=() ARGS=()

usage() {  # the header comment, without its '# '
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}
die() { echo "tpu.sh: $*" >&2; exit 2; }

show() {  # print a command, quoting only the words that need it
  local out="+" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=" $w"; else out+=" ${w@Q}"; fi
  done
  echo "$out"
}
q() {  # one word for the worker's shell: as is when safe, else printf %q
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then echo "$1"; else printf '%q' "$1"; fi
}
do_cmd() { if (( DRY_RUN )); then show "$@"; else "$@"; fi; }
gc() { do_cmd gcloud "$@"; }

where() {  # --zone/--project flags shared by every gcloud call
  echo "--zone=$ZONE"
  if [[ -n "$PROJECT" ]]; then echo "--project=$PROJECT"; fi
}

default_version() {
  case "$TYPE" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for --type=$TYPE; pass --version" ;;
  esac
}

default_workers() {  # hosts per slice
  local n="${TYPE##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot read a size from --type=$TYPE; pass --workers"
  case "$TYPE" in
    v4-*|v5p-*) echo $(( n <= 8 ? 1 : n / 8 )) ;;  # N TensorCores: 2 per chip, 4 chips per host
    v5litepod-*|v5e-*|v6e-*) echo $(( n <= 8 ? 1 : n / 4 )) ;;  # N chips, 4 per host
    *) die "no default worker count for --type=$TYPE; pass --workers" ;;
  esac
}

parse_flags() {
  while (( $# )); do
    case "$1" in
      --name=*) NAME="${1#*=}" ;;        --name) NAME="${2:?--name needs a value}"; shift ;;
      --zone=*) ZONE="${1#*=}" ;;        --zone) ZONE="${2:?--zone needs a value}"; shift ;;
      --project=*) PROJECT="${1#*=}" ;;  --project) PROJECT="${2:?}"; shift ;;
      --type=*) TYPE="${1#*=}" ;;        --type) TYPE="${2:?--type needs a value}"; shift ;;
      --version=*) VERSION="${1#*=}" ;;  --version) VERSION="${2:?}"; shift ;;
      --workers=*) WORKERS="${1#*=}" ;;  --workers) WORKERS="${2:?}"; shift ;;
      --git=*) GIT="${1#*=}" ;;          --git) GIT="${2:?}"; shift ;;
      --ref=*) REF="${1#*=}" ;;          --ref) REF="${2:?}"; shift ;;
      --data=*) DATA="${1#*=}" ;;        --data) DATA="${2:?}"; shift ;;
      --config=*) CONFIG="${1#*=}" ;;    --config) CONFIG="${2:?}"; shift ;;
      --workdir=*) WORKDIR="${1#*=}" ;;  --workdir) WORKDIR="${2:?}"; shift ;;
      --run-id=*) RUN_ID="${1#*=}" ;;    --run-id) RUN_ID="${2:?}"; shift ;;
      --max-attempts=*) MAX_ATTEMPTS="${1#*=}" ;;  --max-attempts) MAX_ATTEMPTS="${2:?}"; shift ;;
      --retry-wait=*) RETRY_WAIT="${1#*=}" ;;      --retry-wait) RETRY_WAIT="${2:?}"; shift ;;
      --spot) CAPACITY=--spot ;;
      --preemptible) CAPACITY=--preemptible ;;
      --queued) QUEUED=1 ;;
      --loop) LOOP=1 ;;
      --retry-failures) RETRY_FAILURES=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) die "unknown flag '$1' (see --help)" ;;
    esac
    shift
  done
  [[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE), e.g. --zone=us-central2-b"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name='$NAME': lowercase letters, digits, -"
  VERSION="${VERSION:-$(default_version)}"
  WORKERS="${WORKERS:-$(default_workers)}"
  [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers='$WORKERS' must be a positive integer"
  if [[ -z "$DATA" && -d "$REPO/../shared/data" ]]; then DATA="$REPO/../shared/data"; fi
}

need_job_flags() {
  [[ -n "$CONFIG" ]] || die "--config is required, e.g. --config=configs/r1_distill_1p5b.py:model.hf_path=/ckpt/r1_distill_1p5b"
  [[ -n "$WORKDIR" ]] || die "--workdir is required, e.g. --workdir=gs://my-bucket/egrc/run1"
  RUN_ID="${RUN_ID:-$(basename "$WORKDIR")}"
  [[ "$RUN_ID" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-id='$RUN_ID': letters, digits, . _ - only"
}

ssh_worker() {  # ssh_worker WORKER COMMAND
  local w
  mapfile -t w < <(where)
  gc compute tpus tpu-vm ssh "$NAME" "${w[@]}" --worker="$1" --command="$2"
}

tpu_state() {  # READY, CREATING, PREEMPTED, ... or MISSING
  local w
  mapfile -t w < <(where)
  if (( DRY_RUN )); then
    show gcloud compute tpus tpu-vm describe "$NAME" "${w[@]}" --format='value(state)' >&2
    echo MISSING
    return
  fi
  gcloud compute tpus tpu-vm describe "$NAME" "${w[@]}" --format='value(state)' 2>/dev/null \
    || echo MISSING
}

wait_ready() {
  local state
  for _ in $(seq 1 240); do  # up to 2 hours (queued resources wait for capacity)
    state="$(tpu_state)"
    if [[ "$state" == READY ]] || (( DRY_RUN )); then return 0; fi
    echo "waiting for $NAME: state $state" >&2
    sleep 30
  done
  die "$NAME is still not READY (state $state)"
}

cmd_create() {
  local w state
  mapfile -t w < <(where)
  state="$(tpu_state)"
  case "$state" in
    READY) echo "reusing TPU $NAME (READY)"; return 0 ;;
    CREATING|STARTING|RESTARTING|REPAIRING) wait_ready; return 0 ;;
    MISSING) ;;
    *) die "TPU $NAME exists in state $state: run 'launch/tpu.sh delete' first or use another --name" ;;
  esac
  local capacity=()
  if [[ -n "$CAPACITY" ]]; then capacity=("$CAPACITY"); fi
  if (( QUEUED )); then
    gc compute tpus queued-resources create "$NAME" --node-id="$NAME" "${w[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${capacity[@]}"
    wait_ready
  else
    gc compute tpus tpu-vm create "$NAME" "${w[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${capacity[@]}"
  fi
  CREATED=1
}

cmd_setup() {
  local w tmp
  mapfile -t w < <(where)
  tmp="$(mktemp -d)"
  if [[ -n "$GIT" ]]; then
    local checkout=""
    if [[ -n "$REF" ]]; then checkout=" && git -C egrc_jax checkout -q $(q "$REF")"; fi
    ssh_worker all "rm -rf egrc_jax && git clone -q $(q "$GIT") egrc_jax$checkout"
  else
    do_cmd tar -czf "$tmp/egrc_jax.tgz" -C "$REPO" --exclude=./.git --exclude=./runs \
      --exclude=./workdir --exclude='*.egg-info' --exclude=__pycache__ .
    gc compute tpus tpu-vm scp "$tmp/egrc_jax.tgz" "$NAME:egrc_jax.tgz" "${w[@]}" --worker=all
    ssh_worker all "rm -rf egrc_jax && mkdir egrc_jax && tar -xzf egrc_jax.tgz -C egrc_jax"
  fi
  if [[ -n "$DATA" && "$DATA" != none ]]; then
    do_cmd tar -czf "$tmp/egrc_data.tgz" -C "$DATA" .
    gc compute tpus tpu-vm scp "$tmp/egrc_data.tgz" "$NAME:egrc_data.tgz" "${w[@]}" --worker=all
    ssh_worker all "rm -rf shared/data && mkdir -p shared/data && tar -xzf egrc_data.tgz -C shared/data"
  fi
  ssh_worker all "$REMOTE_SH setup"
  rm -rf "$tmp"
}

job_command() {  # the trainer command line, quoted for the worker's shell
  local args=(-m egrc_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}") out a
  out="env EGRC_DISTRIBUTED=auto $REMOTE_PY"
  for a in "${args[@]}"; do out+=" $(q "$a")"; done
  echo "$out"
}

cmd_logs() {
  need_job_flags
  local dir="${TPU_LOG_DIR:-$REPO/runs/tpu}/$NAME/$RUN_ID" i status=0 pids=() tail_pid=""
  do_cmd mkdir -p "$dir"
  for (( i = 0; i < WORKERS; i++ )); do
    if (( DRY_RUN )); then
      ssh_worker "$i" "$REMOTE_SH follow $RUN_ID"
      echo "  > $dir/worker-$i.log"
    else
      ssh_worker "$i" "$REMOTE_SH follow $RUN_ID" > "$dir/worker-$i.log" 2>&1 &
      pids+=("$!")
    fi
  done
  if (( DRY_RUN )); then return 0; fi
  echo "following $WORKERS workers; logs in $dir (worker 0 shown here)"
  tail -n +1 -F "$dir/worker-0.log" 2>/dev/null &
  tail_pid=$!
  local rc
  for i in "${!pids[@]}"; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    if (( rc )); then
      echo "worker $i: exit status $rc (see $dir/worker-$i.log)" >&2
      if (( ! status )); then status=$rc; fi
    fi
  done
  kill "$tail_pid" 2>/dev/null || true
  return "$status"
}

cmd_run() {
  need_job_flags
  ssh_worker all "$REMOTE_SH start $RUN_ID -- $(job_command)"
  cmd_logs
}

cmd_delete() {
  local w
  mapfile -t w < <(where)
  if (( QUEUED )); then
    gc compute tpus queued-resources delete "$NAME" "${w[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" "${w[@]}" --quiet
  fi
}

cmd_attempt() {  # one resume attempt, in its own process so that set -e holds throughout
  cmd_create
  if (( CREATED )); then cmd_setup; fi
  cmd_run
}

cmd_resume() {
  need_job_flags
  if (( ! LOOP )); then cmd_run; return; fi
  local attempt rc state
  for (( attempt = 1; attempt <= MAX_ATTEMPTS; attempt++ )); do
    echo "=== attempt $attempt/$MAX_ATTEMPTS of run $RUN_ID on $NAME"
    rc=0
    bash "${BASH_SOURCE[0]}" _attempt "${ARGS[@]}" || rc=$?
    if (( DRY_RUN )); then
      echo "(dry run: one attempt shown; after a failure the loop checks the slice and, when it"
      echo " is not READY, deletes it and starts the next attempt from create + setup):"
      tpu_state > /dev/null
      cmd_delete
      return 0
    fi
    if (( rc == 0 )); then echo "run $RUN_ID finished"; return 0; fi
    state="$(tpu_state)"
    if [[ "$state" != READY ]]; then
      echo "slice $NAME is $state (preempted or gone): recreating, then resuming" >&2
      if [[ "$state" != MISSING ]]; then cmd_delete || true; fi
    elif (( ! RETRY_FAILURES )); then
      die "run $RUN_ID failed (exit $rc) on a READY slice: not a preemption; fix and resume"
    fi
    sleep "$RETRY_WAIT"
  done
  die "run $RUN_ID did not finish in $MAX_ATTEMPTS attempts"
}

cmd_status() {
  echo "TPU $NAME: $(tpu_state)"
  need_job_flags
  ssh_worker all "$REMOTE_SH status $RUN_ID"
}

main() {
  local sub="${1:-}"
  case "$sub" in
    -h|--help|help|"") usage; exit 0 ;;
  esac
  shift
  ARGS=("$@")
  parse_flags "$@"
  case "$sub" in
    _attempt) need_job_flags; cmd_attempt ;;
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    resume) cmd_resume ;;
    logs) cmd_logs ;;
    status) cmd_status ;;
    stop) need_job_flags; ssh_worker all "$REMOTE_SH stop $RUN_ID" ;;
    delete) cmd_delete ;;
    *) die "unknown subcommand '$sub' (see --help)" ;;
  esac
}

main "$@"
