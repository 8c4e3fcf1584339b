"""launch/: shellcheck, the gcloud commands tpu.sh prints in --dry-run, the worker-side job
runner (remote.sh) for real on this machine, and launch/local.sh with 2 jax.distributed CPU
processes doing cross-process reductions (tests/dist_program.py)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from egrc_jax import distributed, launch_local

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
JOB = [
  "--config=configs/r1_distill_1p5b.py:model.hf_path=/ckpt/r1_distill_1p5b,arm=egrc",
  "--workdir=gs://bucket/egrc/r1",
]


def sh(*args, env=None, timeout=60):
  """Run a command; stdout and stderr merged, in order."""
  return subprocess.run(
    [str(a) for a in args],
    cwd=REPO,
    env={**os.environ, **(env or {})},
    timeout=timeout,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def gcloud_lines(out: str) -> list[str]:
  return [line for line in out.splitlines() if line.startswith("+ gcloud ")]


def test_scripts_exist():
  assert {p.name for p in SCRIPTS} >= {"tpu.sh", "local.sh", "remote.sh"}


@pytest.mark.skipif(
  shutil.which("shellcheck") is None,
  reason="shellcheck not installed (apt-get install -y shellcheck)",
)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  r = sh("shellcheck", script)
  assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  r = sh("bash", script, "--help")
  assert r.returncode == 0 and "usage:" in r.stdout, r.stdout


# -- tpu.sh --dry-run ----------------------------------------------------------------------


def test_tpu_run_dry_run():
  r = sh(
    LAUNCH / "tpu.sh",
    "run",
    "--zone=us-central2-b",
    "--type=v4-32",
    "--project=p1",
    *JOB,
    "--dry-run",
    "--",
    "--config.seed=3",
  )
  assert r.returncode == 0, r.stdout
  lines = gcloud_lines(r.stdout)
  start = [x for x in lines if "--worker=all" in x]
  assert len(start) == 1
  for flag in (
    "tpu-vm ssh egrc",
    "--zone=us-central2-b",
    "--project=p1",
    "remote.sh start r1",
    "EGRC_DISTRIBUTED=auto",
    "python -m egrc_jax.main",
    JOB[0],
    JOB[1],
    "--config.seed=3",
  ):
    assert flag in start[0], (flag, start[0])
  # v4-32 = 32 TensorCores = 16 chips on 4 hosts: one log follower per worker.
  follow = [x for x in lines if "remote.sh follow r1" in x]
  assert [f"--worker={i}" in x for i, x in enumerate(follow)] == [True] * 4
  assert "runs/tpu/egrc/r1/worker-3.log" in r.stdout


@pytest.mark.parametrize(
  "flags, expected",
  [
    (
      ["--type=v4-32", "--spot"],
      ["tpu-vm create egrc", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"],
    ),
    (
      ["--type=v5litepod-64", "--preemptible"],
      ["--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite", "--preemptible"],
    ),
    (
      ["--type=v5p-32", "--queued", "--spot"],
      [
        "queued-resources create egrc",
        "--node-id=egrc",
        "--accelerator-type=v5p-32",
        "--runtime-version=v2-alpha-tpuv5",
        "--spot",
      ],
    ),
  ],
)
def test_tpu_create_dry_run(flags, expected):
  r = sh(LAUNCH / "tpu.sh", "create", "--zone=europe-west4-a", *flags, "--dry-run")
  assert r.returncode == 0, r.stdout
  create = [x for x in gcloud_lines(r.stdout) if " create " in x]
  assert len(create) == 1
  for flag in [*expected, "--zone=europe-west4-a"]:
    assert flag in create[0], (flag, create[0])


def test_tpu_setup_dry_run():
  r = sh(LAUNCH / "tpu.sh", "setup", "--zone=us-central2-b", "--data=none", "--dry-run")
  lines = gcloud_lines(r.stdout)
  assert r.returncode == 0 and all("--worker=all" in x for x in lines), r.stdout
  assert any("tpu-vm scp" in x and "egrc:egrc_jax.tgz" in x for x in lines)
  assert "remote.sh setup" in lines[-1]
  git = sh(
    LAUNCH / "tpu.sh",
    "setup",
    "--zone=z",
    "--data=none",
    "--git=https://x/egrc.git",
    "--ref=v1",
    "--dry-run",
  )
  assert "git clone -q https://x/egrc.git egrc_jax && git -C egrc_jax checkout -q v1" in git.stdout
  assert "tpu-vm scp" not in git.stdout


def test_tpu_resume_loop_dry_run():
  r = sh(
    LAUNCH / "tpu.sh",
    "resume",
    "--loop",
    "--queued",
    "--spot",
    "--zone=us-central2-b",
    *JOB,
    "--dry-run",
  )
  assert r.returncode == 0, r.stdout
  out = r.stdout
  order = [
    "queued-resources create",
    "remote.sh setup",
    "remote.sh start r1",
    "remote.sh follow r1",
    "queued-resources delete egrc",
  ]
  positions = [out.index(x) for x in order]
  assert positions == sorted(positions), out
  assert "--force --quiet" in out


def test_tpu_delete_and_errors():
  r = sh(LAUNCH / "tpu.sh", "delete", "--zone=us-central2-b", "--name=run-7", "--dry-run")
  assert gcloud_lines(r.stdout) == [
    "+ gcloud compute tpus tpu-vm delete run-7 --zone=us-central2-b --quiet"
  ]
  for args, message in [
    (["run", "--dry-run"], "--zone is required"),
    (["run", "--zone=z", "--dry-run"], "--config is required"),
    (["create", "--zone=z", "--type=v9-8", "--dry-run"], "no default runtime for --type=v9-8"),
    (["launch", "--zone=z"], "unknown subcommand 'launch'"),
    (["run", "--zone=z", "--bogus"], "unknown flag '--bogus'"),
  ]:
    r = sh(LAUNCH / "tpu.sh", *args, env={"TPU_ZONE": ""})
    assert r.returncode == 2 and message in r.stdout, (args, r.stdout)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stands in for gcloud: records each call; the slice is READY after create, and every log
# follower of the first slice fails as if the slice had been preempted under it.
echo "$*" >> "$FAKE/calls"
case "$*" in
  *"tpu-vm describe"*) [[ -f "$FAKE/state" ]] || exit 1; cat "$FAKE/state" ;;
  *"tpu-vm create"*) echo READY > "$FAKE/state"; echo x >> "$FAKE/creates" ;;
  *"tpu-vm delete"*) rm -f "$FAKE/state" ;;
  *"remote.sh follow"*)
    if [[ "$(wc -l < "$FAKE/creates")" -eq 1 ]]; then echo PREEMPTED > "$FAKE/state"; exit 255; fi
    echo "step 100 done" ;;
esac
"""


def test_tpu_resume_loop_recreates_after_preemption(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "FAKE": str(tmp_path),
    "TPU_LOG_DIR": str(tmp_path / "logs"),
  }
  r = sh(
    LAUNCH / "tpu.sh",
    "resume",
    "--loop",
    "--spot",
    "--zone=us-central2-b",
    "--data=none",
    "--retry-wait=0",
    *JOB,
    env=env,
    timeout=60,
  )
  assert r.returncode == 0, r.stdout
  assert "slice egrc is PREEMPTED (preempted or gone): recreating" in r.stdout
  assert "run r1 finished" in r.stdout
  calls = (tmp_path / "calls").read_text().splitlines()
  kinds = [c.split()[3] if c.startswith("compute tpus tpu-vm") else c for c in calls]
  creates = [i for i, c in enumerate(calls) if c.startswith("compute tpus tpu-vm create")]
  deletes = [i for i, c in enumerate(calls) if c.startswith("compute tpus tpu-vm delete")]
  assert len(creates) == 2 and len(deletes) == 1 and creates[0] < deletes[0] < creates[1], kinds
  assert all("--spot" in calls[i] for i in creates)
  starts = [c for c in calls if "remote.sh start r1" in c]
  assert len(starts) == 2 and all("--worker=all" in c for c in starts)
  logs = sorted((tmp_path / "logs" / "egrc" / "r1").glob("worker-*.log"))
  assert [p.name for p in logs] == [f"worker-{i}.log" for i in range(4)]
  assert all("step 100 done" in p.read_text() for p in logs)


# -- remote.sh, for real -------------------------------------------------------------------


def test_remote_start_follow_status_stop(tmp_path):
  env = {"EGRC_LOG_DIR": str(tmp_path), "EGRC_POLL_S": "0.2"}
  remote = LAUNCH / "remote.sh"
  r = sh(remote, "start", "job1", "--", "bash", "-c", "echo in $PWD; sleep 0.5; exit 3", env=env)
  assert r.returncode == 0 and "started run 'job1'" in r.stdout, r.stdout
  again = sh(remote, "start", "job1", "--", "true", env=env)
  assert again.returncode == 2 and "already running" in again.stdout
  follow = sh(remote, "follow", "job1", env=env, timeout=30)
  assert follow.returncode == 3, follow.stdout  # the job's own exit status
  assert f"in {REPO}" in follow.stdout  # jobs run from the repo root
  assert "exited 3" in sh(remote, "status", "job1", env=env).stdout
  sh(remote, "start", "job2", "--", "sleep", "60", env=env)
  assert "running" in sh(remote, "status", "job2", env=env).stdout
  assert "sent SIGTERM" in sh(remote, "stop", "job2", env=env).stdout
  t0 = time.monotonic()
  assert sh(remote, "follow", "job2", env=env, timeout=30).returncode == 1
  assert time.monotonic() - t0 < 10
  setup = sh(remote, "setup", "--dry-run", env={"EGRC_PYTHON": sys.executable})
  assert "pip install -q -e" in setup.stdout and "[tpu]" in setup.stdout


# -- local launcher and jax.distributed ------------------------------------------------------


def test_spec_from_env():
  spec = distributed.spec_from_env(
    {"EGRC_COORDINATOR": "localhost:1234", "EGRC_NUM_PROCESSES": "2", "EGRC_PROCESS_ID": "1"}
  )
  assert spec == distributed.ProcessSpec("localhost:1234", 2, 1)
  assert distributed.spec_from_env({"EGRC_DISTRIBUTED": "auto"}) == "auto"
  assert distributed.spec_from_env({}) is None
  with pytest.raises(ValueError, match="EGRC_PROCESS_ID=2 must be in"):
    distributed.spec_from_env(
      {"EGRC_COORDINATOR": "h:1", "EGRC_NUM_PROCESSES": "2", "EGRC_PROCESS_ID": "2"}
    )
  with pytest.raises(ValueError, match="EGRC_NUM_PROCESSES must be an integer"):
    distributed.spec_from_env({"EGRC_COORDINATOR": "h:1", "EGRC_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="must be host:port"):
    distributed.spec_from_env(
      {"EGRC_COORDINATOR": "h", "EGRC_NUM_PROCESSES": "1", "EGRC_PROCESS_ID": "0"}
    )


def test_shutdown_timeout_from_env():
  assert distributed.shutdown_timeout({"EGRC_SHUTDOWN_TIMEOUT_S": "900"}) == 900
  for bad in ("0", "-5", "1.5", "soon"):
    with pytest.raises(ValueError, match="EGRC_SHUTDOWN_TIMEOUT_S"):
      distributed.shutdown_timeout({"EGRC_SHUTDOWN_TIMEOUT_S": bad})


def test_process_env_replaces_device_count():
  launch = launch_local.LocalLaunch(("true",), num_processes=3, devices_per_process=2)
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"}
  env = launch_local.process_env(base, launch, 9999, 2)
  assert env["XLA_FLAGS"].split() == [
    "--xla_dump_to=/tmp/x",
    "--xla_force_host_platform_device_count=2",
  ]
  assert (env["EGRC_COORDINATOR"], env["EGRC_NUM_PROCESSES"], env["EGRC_PROCESS_ID"]) == (
    "localhost:9999",
    "3",
    "2",
  )
  assert env["JAX_PLATFORMS"] == "cpu"


def test_local_launcher_failure_stops_the_others():
  code = (
    "import os, sys, time; r = int(os.environ['EGRC_PROCESS_ID']); print('up', r, flush=True);"
    " time.sleep(0.3 if r == 1 else 60); sys.exit(5 if r == 1 else 0)"
  )
  t0 = time.monotonic()
  r = sh(LAUNCH / "local.sh", "--num_processes=3", "--", sys.executable, "-c", code)
  assert r.returncode == 5, r.stdout
  assert time.monotonic() - t0 < 20  # the sleepers were terminated, not waited for
  assert {f"[{i}] up {i}" for i in range(3)} <= set(r.stdout.splitlines())
  assert "[launch] stopping the remaining processes (exit status 5)" in r.stdout


def test_local_launcher_timeout_prints_the_stacks_of_hung_ranks():
  # A rank of ours registers the SIGUSR1 stack dump (egrc_jax.distributed); the launcher sends
  # it before stopping the processes, so a hang says where each rank waited.
  code = (
    "import time; from egrc_jax import distributed; distributed.dump_stacks_on_sigusr1();"
    " print('up', flush=True)\ndef wait_here():\n  time.sleep(300)\nwait_here()"
  )
  t0 = time.monotonic()
  # 40 s: importing jax takes several seconds on a slow 2-core machine under load.
  r = sh(LAUNCH / "local.sh", "--num_processes=2", "--timeout=40", "--", sys.executable, "-c",
         code, timeout=120)  # fmt: skip
  assert r.returncode == 124, r.stdout
  assert time.monotonic() - t0 < 100
  assert "[launch] stopping the remaining processes (timeout 40.0s)" in r.stdout
  for rank in (0, 1):
    assert f"[{rank}] up" in r.stdout
    assert re.search(rf"^\[{rank}\] .*line 3 in wait_here$", r.stdout, re.M), r.stdout


def test_local_launcher_two_processes_psum():
  # 2 processes x 4 CPU devices: one 8-device mesh, cross-process sum and psum over gloo.
  r = sh(
    LAUNCH / "local.sh",
    "--num_processes=2",
    "--devices_per_process=4",
    "--timeout=90",
    "--",
    sys.executable,
    REPO / "tests" / "dist_program.py",
    timeout=120,
  )
  assert r.returncode == 0, r.stdout
  for rank in (0, 1):
    assert f"[{rank}] OK rank={rank} processes=2 devices=8 sum=120.0 psum=28.0" in r.stdout
