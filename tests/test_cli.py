"""What a user runs: re-runs never replace a run's results, bad input leaves nothing behind,
and every command ends a user error with one line and exit code 2."""

import importlib
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from egrc_jax import cli
from egrc_jax import main as main_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A tiny run that trains something: the entropy bonus moves a random model even without reward.
FAST = (
  "data.prompts_per_step=4,rollout.num_samples=2,rollout.max_new_tokens=8,"
  "data.max_prompt_tokens=256,rollout.prompt_buckets=256,optim.micro_batch_rows=4,"
  "eval.num_prompts=0,checkpoint.every=1,arm=grpo,single.steps=2,grading.mode=exact,"
  "loss.entropy_coef=0.5,optim.lr=1e-2"
)


def run_main(argv, capfd=None):
  rc = cli.run(main_lib.main, argv)
  out = capfd.readouterr() if capfd is not None else None
  return rc, out


def _one_error_line(err: str) -> str:
  """The one `error: ...` line of stderr, which ends it; no traceback anywhere."""
  lines = err.splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
  return errors[0]


def _files(d: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _restore_logging():
  # main() rewires the root logger for its console and log file; put pytest's back after.
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  yield
  for h in list(root.handlers):
    root.removeHandler(h)
  for h in handlers:
    root.addHandler(h)
  root.setLevel(level)


def _config(shared_data, extra=""):
  spec = f"configs/tiny.py:{FAST},data.data_root={shared_data}"
  return f"--config={spec}{',' + extra if extra else ''}"


def test_rerun_of_a_finished_run_keeps_its_trained_export(tmp_path, shared_data, capfd):
  wd = tmp_path / "run"
  rc, out = run_main([_config(shared_data), f"--workdir={wd}"], capfd)
  assert rc == 0, out.err
  trained = _files(wd / "hf_final")
  # The console shows progress and warnings only; library INFO goes to log.txt, once.
  console = out.out.splitlines() + out.err.splitlines()
  assert not [line for line in console if " INFO " in line or line.startswith("I1")], console
  assert len(console) < 40, console
  log_text = (wd / "log.txt").read_text()
  assert "INFO" in log_text
  # Re-running the finished run used to export the *starting* model into hf_final.
  rc, out = run_main([_config(shared_data), f"--workdir={wd}"], capfd)
  assert rc == 0, out.err
  assert "had finished before" in out.out
  assert _files(wd / "hf_final") == trained
  result = json.loads(out.out[out.out.index("{") :])
  assert result["already_finished"] and result["global_step"] == 2
  # Without hf_final, the re-run exports the final checkpoint's params: the same bytes.
  for p in (wd / "hf_final").iterdir():
    p.unlink()
  (wd / "hf_final").rmdir()
  assert run_main([_config(shared_data), f"--workdir={wd}"])[0] == 0
  assert _files(wd / "hf_final") == trained
  # Another model shape is refused before anything is written (it used to export a random
  # model): one line, exit 2, config.json and hf_final untouched.
  before = _files(wd)
  rc, out = run_main([_config(shared_data, "model.hidden_size=32"), f"--workdir={wd}"], capfd)
  # (the data's own warnings may come first; the error is one line, the last)
  assert rc == 2 and _one_error_line(out.err).count("different model") == 1
  assert "hidden_size: checkpoint 64 vs run 32" in out.err
  assert _files(wd) == before


def test_bad_model_path_leaves_no_workdir(tmp_path, shared_data, capfd):
  wd = tmp_path / "never"
  rc, out = run_main(
    [_config(shared_data, "model.hf_path=/no/such/model"), f"--workdir={wd}"], capfd
  )
  assert rc == 2 and out.err.startswith("error: ") and out.err.count("\n") == 1
  assert "/no/such/model" in out.err and not wd.exists()


def test_evaluate_typo_does_not_poison_the_workdir(tmp_path, capfd):
  from tiny_hf_model import save_tiny_model

  from egrc_jax.evaluate.__main__ import main as eval_main

  model = save_tiny_model(tmp_path / "model")
  capfd.readouterr()  # transformers' own progress bars while saving the model
  wd = tmp_path / "eval"
  flags = ["--benchmarks=gsm8k", "--limit=1", "--n=1", "--max_new_tokens=4",
           "--prompt_buckets=1024", "--grader_workers=1"]  # fmt: skip
  rc = cli.run(eval_main, [f"--model={tmp_path / 'nope'}", f"--workdir={wd}", *flags])
  err = capfd.readouterr().err
  assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "is not a model" in err
  assert not wd.exists()  # no eval_config.json that would refuse the corrected command
  assert cli.run(eval_main, [f"--model={model}", f"--workdir={wd}", *flags]) == 0
  assert (wd / "results.json").is_file()


def test_release_with_bad_results_leaves_no_out(tmp_path, capfd):
  from tiny_hf_model import save_tiny_model

  from egrc_jax.release import main as release_main

  model = save_tiny_model(tmp_path / "model")
  capfd.readouterr()
  out = tmp_path / "rel"
  rc = cli.run(release_main, [f"--run={model}", f"--results={tmp_path / 'nope'}", f"--out={out}"])
  err = capfd.readouterr().err
  assert rc == 2 and "results.json not found" in err and err.count("\n") == 1
  assert not out.exists()


# -- every documented command: --help, and one bad input -----------------------------------
# (module, a bad command line, a fragment of its one-line error)
COMMANDS = [
  ("egrc_jax.main", ["--config=configs/tiny.py:compress.stepz=2", "--workdir=/tmp/x"],
   "unknown config key 'compress.stepz'"),
  ("egrc_jax.main", ["--config.compress.stepz=2", "--config=configs/tiny.py", "--workdir=/x"],
   "unknown config key 'compress.stepz'"),
  ("egrc_jax.main", ["--config=configs/nope.py", "--workdir=/tmp/x"], "does not exist"),
  ("egrc_jax.main", ["--config=configs/tiny.py"], "required: --workdir"),
  ("egrc_jax.trainer.branch", ["--source=/nope", "--step=2", "--dest=/tmp/b"], "not a directory"),
  ("egrc_jax.hf.__main__", ["import", "--hf=/nope", "--out=/tmp/o"], "config.json not found"),
  ("egrc_jax.hf.__main__", ["export", "--checkpoint=/nope", "--out=/tmp/o"], "native checkpoint"),
  ("egrc_jax.demo", ["--bogus"], "unrecognized arguments"),
  ("egrc_jax.evaluate.__main__", ["--model=/nope", "--workdir=/tmp/e"], "is not a model"),
  ("egrc_jax.evaluate.__main__", ["--model=/nope", "--workdir=/tmp/e", "--n=0"], "n=0"),
  ("egrc_jax.analysis.__main__", ["curves", "--workdir=/nope", "--out=/tmp/a"], "metrics.jsonl"),
  ("egrc_jax.analysis.__main__", ["high_entropy_tokens", "--out=/tmp/a"], "exactly one of"),
  ("egrc_jax.release", ["--run=/nope", "--out=/tmp/r"], "is not a model"),
  ("egrc_jax.toy.pipeline", ["--workdir=/tmp/t", "--seeds=a"], "--seeds='a'"),
  ("egrc_jax.toy.sft", ["--workdir=/tmp/t", "--steps=0"], "steps=0"),
  ("egrc_jax.toy.conflict", ["--workdir=/tmp/t/seed0"], "no model at"),
  ("egrc_jax.toy.conflict", ["--workdir=/tmp/t/seed0", "--prompts=0"], "--prompts=0 must be >= 1"),
  ("egrc_jax.bench.grading", ["--data=/nope"], "not found"),
  ("egrc_jax.bench.sampler", ["--bogus"], "unrecognized arguments"),
  ("egrc_jax.bench.learner", ["--cases=toy,nope"], "--cases ['nope']: use some of"),
  ("egrc_jax.bench.learner", ["--micro-batch-rows=-1"], "--micro-batch-rows=-1 must be >= 0"),
  ("egrc_jax.launch_local", ["--num_processes=0", "--", "true"], "num_processes"),
  # The mesh the user's config gives, not one the planner made up (mesh.fsdp=-1 over 15).
  ("egrc_jax.plan.cli", ["--config=configs/r1_distill_7b.py", "--chip=v4", "--num_chips=15"],
   "(mesh.data=1, mesh.fsdp=-1, mesh.tensor=4) does not fit 15 chips"),
]  # fmt: skip


@pytest.mark.parametrize("module", sorted({m for m, _, _ in COMMANDS}))
def test_every_command_has_help(module, capsys):
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("module,argv,fragment", COMMANDS, ids=lambda x: str(x)[:40])
def test_every_command_ends_bad_input_with_one_line(module, argv, fragment, capsys, tmp_path):
  main = importlib.import_module(module).main
  rc = cli.run(main, [a.replace("/tmp/", f"{tmp_path}/") for a in argv])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert fragment in err and "Traceback" not in err


def test_debug_flag_shows_the_traceback():
  with pytest.raises(FileNotFoundError):
    cli.run(main_lib.main, ["--config=configs/nope.py", "--workdir=/tmp/x", "--debug"])


@pytest.mark.parametrize("module", ["egrc_jax.main", "egrc_jax.evaluate"])
def test_python_m_prints_one_line_and_exits_2(module, tmp_path):
  # The real entry point, as a user runs it: no traceback, exit status 2.
  argv = {"egrc_jax.main": ["--config=configs/tiny.py:nope=1", f"--workdir={tmp_path}/w"],
          "egrc_jax.evaluate": ["--model=/nope", f"--workdir={tmp_path}/e"]}[module]  # fmt: skip
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)  # fmt: skip
  assert r.returncode == 2, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
