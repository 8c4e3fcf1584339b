"""Two processes x 4 CPU devices (JAX's gloo collectives) run the tiny config like one
process x 8 devices with the same global mesh and seed, and resume from their checkpoint."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_trainer import FAST, ROOT, _final_params, read_metrics, tiny

from egrc_jax.trainer.loop import Trainer

# The launched ranks run alongside the other xdist worker: never next to the libtpu compiles
# of tests/test_aot.py (same group, so one worker runs both files in turn), which starve the
# ranks of CPU for minutes (scripts/test.sh runs pytest with --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]


def launch_two(workdir, overrides: str, timeout=700):
  cmd = [
    "bash",
    str(ROOT / "launch" / "local.sh"),
    "--num_processes=2",
    "--devices_per_process=4",
    # A hung rank is stopped, with every thread's stack printed, by the launcher: the ranks'
    # shutdown barrier waits longer (EGRC_SHUTDOWN_TIMEOUT_S below; JAX's default 300 s
    # would abort both ranks first without saying where they waited).
    "--timeout=560",
    "--",
    sys.executable,
    "-m",
    "egrc_jax.main",
    f"--config=configs/tiny.py:{FAST}{',' + overrides if overrides else ''}",
    f"--workdir={workdir}",
  ]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the launcher sets each process's device count
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
  env["EGRC_SHUTDOWN_TIMEOUT_S"] = "900"
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, failure_text(out)
  return out.stdout


def failure_text(out, limit: int = 6000) -> str:
  """The launch's output without the C++ stack frames of an abort (which would fill the
  assertion message): the ranks' last lines, and their Python stacks when the launcher
  stopped a hung rank (SIGUSR1, egrc_jax.distributed.dump_stacks_on_sigusr1)."""
  lines = [
    x
    for x in (out.stdout + out.stderr).splitlines()
    if not x.lstrip("[0123456789] ").startswith("@ ")
  ]
  return "\n".join(lines)[-limit:]


def test_two_processes_match_one_and_resume(tmp_path, shared_data):
  if os.path.abspath(shared_data) != os.path.abspath(ROOT.parent / "shared" / "data"):
    pytest.skip("the launched processes read ../shared/data relative to the repository")
  one, two = tmp_path / "one", tmp_path / "two"
  Trainer(tiny("", shared_data), str(one)).run()
  first = launch_two(two, "run_steps=3")  # stops inside stage 2, checkpointed
  assert '"stopped_early": "run_steps"' in first
  launch_two(two, "")  # resumes at step 3 from the shared workdir
  rows_one, _ = read_metrics(one)
  rows_two, events = read_metrics(two)
  assert any(e["event"] == "resumed" for e in events)
  assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2, 3, 4]
  # Gloo's cross-process all-reduce sums in another order than the in-process one, so
  # float32 results agree to rounding, not bitwise; the sampled tokens are the same.
  for a, b in zip(rows_one, rows_two, strict=True):
    assert a["length/mean"] == b["length/mean"] and a["reward/total"] == b["reward/total"]
    for key in ("loss", "grad_norm", "entropy/mean"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  pa, _ = _final_params(one, tiny("", shared_data))
  pb, meta = _final_params(two, tiny("", shared_data))
  assert meta["global_step"] == 4
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  assert json.loads((two / "config.json").read_text())["arm"] == "egrc"


def test_two_process_evaluation_matches_one(tmp_path, shared_data):
  from tiny_hf_model import save_tiny_model

  from egrc_jax.evaluate.__main__ import main as evaluate_main

  model = save_tiny_model(tmp_path / "model")
  args = [
    f"--model={model}", "--benchmarks=gsm8k,math500", "--limit=2", "--n=2",
    "--max_new_tokens=8", "--batch_prompts=2", "--mesh=1,-1,1", "--grader_workers=1",
    f"--data_root={shared_data}",
  ]  # fmt: skip
  assert evaluate_main([*args, f"--workdir={tmp_path / 'one'}"]) == 0
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  cmd = ["bash", str(ROOT / "launch" / "local.sh"), "--num_processes=2",
         "--devices_per_process=4", "--", sys.executable, "-m", "egrc_jax.evaluate", *args,
         f"--workdir={tmp_path / 'two'}"]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, failure_text(out)

  def samples(d):
    rows = [json.loads(line) for line in open(tmp_path / d / "samples.jsonl")]
    return sorted((r["benchmark"], r["id"], r["sample"], r["text"], r["correct"]) for r in rows)

  assert samples("one") == samples("two") and len(samples("one")) == 8  # written once
