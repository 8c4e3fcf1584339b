"""The toy reproduction pipeline end to end (the `quick` preset: tiny SFT, 2 RL steps per
stage, 50 test problems), so a regression in any phase breaks the suite; and its report's rules."""

import dataclasses
import json
import math
import pathlib
import re

import numpy as np
import pytest

from egrc_jax.toy import pipeline, report
from egrc_jax.toy import plan as toy_plan
from egrc_jax.toy import task as T

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One xdist worker runs this file: the module-scoped quick pipeline (~90 s) is built once,
# not once per worker (scripts/test.sh runs pytest with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("toy_pipeline")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy")
  # EE* stands in for EE (the trainer's own tests run the ee arm), and the entropy-conflict
  # diagnostics run on a few problems, so every section of the report is written.
  rep = pipeline.main([
    "--workdir", str(workdir),
    f"--config={ROOT}/configs/toy.py:quick,pipeline.arms=egrc+ee_star+reverse,"
    "pipeline.conflict_prompts=4",
  ])  # fmt: skip
  return workdir, rep


def test_quick_pipeline_writes_the_report(quick_run):
  workdir, rep = quick_run
  md = (workdir / "report.md").read_text()
  on_disk = json.loads((workdir / "report.json").read_text())
  assert on_disk["table"] == json.loads(json.dumps(rep["table"]))
  assert [n for n, _ in report.present(rep["seeds"])] == [
    "sft", "compress_only", "egrc", "ee_star", "reverse"
  ]  # fmt: skip
  for name, label in report.present(rep["seeds"]):
    row = rep["table"][name]
    for key in ("accuracy", "mean_length", "length_ratio"):
      assert math.isfinite(row[key]["mean"]), (name, key, row[key])
    assert 0 <= row["accuracy"]["mean"] <= 1
    assert 1 <= row["mean_length"]["mean"] <= rep["settings"]["eval_max_new_tokens"] == 64
    # The Markdown table has the row with three numbers.
    assert re.search(rf"^\| {re.escape(label)} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", md, re.M), label
  assert rep["table"]["sft"]["length_ratio"]["mean"] == 1.0
  assert len(rep["verdicts"]) == 3 and len(rep["comparisons"]) == 2
  assert all(v["text"] in md for v in rep["verdicts"])
  seed = rep["seeds"]["0"]
  assert {m["num_problems"] for m in seed["eval"].values()} == {50}
  for field in report.ENTROPY_CURVES:
    for point in report.ENTROPY_POINTS:
      assert math.isfinite(seed[field][point]["entropy"]), (field, point)
  assert "entropy/at_temperature" in md and "entropy/mean" in md


def test_compress_only_is_egrc_stage_one_checkpoint(quick_run):
  workdir, rep = quick_run
  seed = rep["seeds"]["0"]
  assert seed["switch_step"] == 2  # compress.steps in quick mode
  assert (workdir / "seed0" / "egrc" / "checkpoints" / "2" / "state").is_dir()
  assert "stage-1 end checkpoint" in (workdir / "report.md").read_text()


def test_curves_and_high_entropy_tokens(quick_run):
  workdir, rep = quick_run
  png = workdir / rep["seeds"]["0"]["curves"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  curves = json.loads((png.parent / "curves.json").read_text())
  assert set(curves["runs"]) == {"egrc", "ee_star", "reverse"}
  # The two-stage arms mark their switch (stage 2 begins at step 2).
  assert [s["step"] for s in curves["runs"]["egrc"]["stage_switches"]] == [0, 2]
  for name in ("sft", "egrc"):
    tokens = rep["seeds"]["0"]["high_entropy"][name]
    assert 0 < len(tokens["top"]) <= 20 and 0 <= tokens["connector_share"] <= 1
    assert tokens["num_high"] >= math.ceil(0.2 * tokens["num_tokens"])


def test_hf_export_check_ran_and_matches(quick_run):
  workdir, rep = quick_run
  check = rep["seeds"]["0"]["hf_check"]
  assert check["num_prompts"] == 3 and (workdir / "seed0" / "egrc" / "hf_final").is_dir()
  for r in check["records"]:
    assert r["tokens_ours"] and r["tokens_transformers"]
  # Same float32 weights in two frameworks: only summation order differs (observed ~5e-6).
  assert check["max_abs_logit_diff"] < 1e-3
  assert check["all_match"], [(r["text_ours"], r["text_transformers"]) for r in check["records"]]


def test_cli_flags_reach_the_pipeline_plan():
  def plan(*flags):
    return pipeline.plan_from_args(pipeline.build_parser().parse_args(["--workdir=x", *flags]))

  assert plan().eval_max_new_tokens == 448 and plan().seeds == (0,)
  assert plan(f"--config={ROOT}/configs/toy.py:quick").eval_max_new_tokens == 64
  p = plan(f"--config={ROOT}/configs/toy.py:cot.recheck_prob=0.75,sft.steps=900", "--seeds=0,1,2")
  assert p.cot == T.CotConfig(recheck_prob=0.75) and p.sft.steps == 900 and p.seeds == (0, 1, 2)
  with pytest.raises(ValueError, match="section 'eval': max_new_tokens=-1"):
    plan(f"--config={ROOT}/configs/toy.py:eval.max_new_tokens=-1")
  with pytest.raises(ValueError, match="--seeds='a'"):
    plan("--seeds=a")


def test_compile_cache_folder(tmp_path):
  # By default under the workdir; a folder given on the command line; "none" turns it off;
  # one set already (JAX_COMPILATION_CACHE_DIR, or the test session's) wins over both.
  folder = pipeline.compile_cache_folder
  assert folder(tmp_path) == str(tmp_path / "compile_cache")
  assert folder(tmp_path, str(tmp_path / "c")) == str(tmp_path / "c")
  assert folder(tmp_path, "none") is None
  assert folder(tmp_path, "none", "/set") == folder(tmp_path, "", "/set") == "/set"
  args = pipeline.build_parser().parse_args(["--workdir=x", "--compile-cache=none"])
  assert args.compile_cache == "none"


def test_parse_problem_round_trips():
  train, _ = T.make_splits(T.TaskConfig(), 50, 5, seed=3)
  for p in train:
    assert pipeline.parse_problem(p.text, str(p.answer)) == p
  with pytest.raises(ValueError, match="round-trip"):
    pipeline.parse_problem(train[0].text, train[0].answer + 1)
  with pytest.raises(ValueError, match="not a toy problem"):
    pipeline.parse_problem("what is 2 + 2 ?")


def test_entropy_points_use_each_step_once():
  rows = [{"step": s, "entropy/mean": float(s)} for s in range(1, 11)]
  # A resumed run logs again the steps after its last checkpoint; the later value counts.
  rows.insert(4, {"step": 5, "entropy/mean": 100.0})
  rows.append({"step": 4, "eval/compress/accuracy": 0.5})  # eval row: no entropy
  p = report.entropy_points(rows, switch=6, k=3)
  assert p["start"] == {"entropy": np.mean([1, 2, 3]), "steps": [1, 3]}
  assert p["switch"] == {"entropy": np.mean([4, 5, 6]), "steps": [4, 6]}
  assert p["after_switch"] == {"entropy": np.mean([7, 8, 9]), "steps": [7, 9]}
  assert p["end"] == {"entropy": np.mean([8, 9, 10]), "steps": [8, 10]}


def test_stage2_trend_against_numpy_and_hand_values():
  # An exact line: slope 0.01 per step, no residual. Stage-1 rows and a repeated step (the
  # later value counts) do not enter.
  rows = [{"step": s, "entropy/mean": 5.0} for s in range(1, 5)]
  rows += [{"step": s, "entropy/mean": 0.1 + 0.01 * s} for s in range(5, 11)]
  rows.insert(5, {"step": 6, "entropy/mean": 9.0})  # overwritten by the later step-6 row
  t = report.stage2_trend(rows, switch=4)
  assert t["slope"] == pytest.approx(0.01) and t["se"] == pytest.approx(0, abs=1e-12)
  assert t["steps"] == 6
  # Noisy: slope and standard error as numpy's least squares gives them.
  rng = np.random.default_rng(0)
  y = 0.2 + 0.001 * np.arange(40) + rng.normal(0, 0.01, 40)
  rows = [{"step": 41 + i, "entropy/mean": float(v)} for i, v in enumerate(y)]
  t = report.stage2_trend(rows, switch=40)
  (slope, _), cov = np.polyfit(np.arange(40), y, 1, cov="unscaled")
  resid = y - np.polyval(np.polyfit(np.arange(40), y, 1), np.arange(40))
  se = np.sqrt(cov[0, 0] * (resid @ resid) / 38)
  assert t["slope"] == pytest.approx(slope) and t["se"] == pytest.approx(se)
  assert t["t"] == pytest.approx(slope / se) and t["t"] > 2
  assert np.isnan(report.stage2_trend(rows[:2], switch=40)["slope"])  # too few steps


def _points(start, switch, after, end) -> dict:
  return {n: {"entropy": v, "steps": [1, 3]} for n, v in
          zip(report.ENTROPY_POINTS, (start, switch, after, end), strict=True)}  # fmt: skip


def test_entropy_directions_separate_the_temperature_jump_from_the_stage_trend():
  # Sampling-temperature curve of a run whose entropy jumps at the switch (T 0.6 -> 1.0) and
  # then falls: the jump is reported, but it is not a rise during the enhancement stage.
  seeds = {"0": {"p": _points(0.13, 0.04, 0.20, 0.16)}, "1": {"p": _points(0.12, 0.05, 0.22, 0.18)}}
  compress, jump, enhance = report.entropy_directions(seeds, "p")
  assert compress["met"] and compress["per_seed"] == pytest.approx([-0.09, -0.07])
  assert jump["claim"] is None and jump["met"] is None and jump["mean_change"] > 0
  assert enhance["claim"] == "rises" and not enhance["met"]
  assert enhance["mean_change"] == pytest.approx(-0.04)
  assert "not reproduced" in enhance["text"]
  seeds["0"]["p"] = _points(0.2, 0.1, 0.1, 0.3)
  seeds["1"]["p"] = _points(0.2, 0.1, 0.1, 0.12)
  assert report.entropy_directions(seeds, "p")[2]["met"]  # mean change +0.11


def test_entropy_points_read_either_curve():
  rows = [{"step": s, "entropy/mean": 1.0, "entropy/at_temperature": float(s)} for s in range(1, 9)]
  p = report.entropy_points(rows, switch=4, k=2, key="entropy/at_temperature")
  assert p["switch"]["entropy"] == 3.5 and p["after_switch"]["entropy"] == 5.5
  assert report.entropy_points(rows, switch=4, k=2)["end"]["entropy"] == 1.0


def _tab(values: dict) -> dict:
  return {
    name: {"accuracy": report.spread([a]), "length_ratio": report.spread([r])}
    for name, (a, r) in values.items()
  }


def test_ablation_sentences_follow_the_numbers():
  # 500 problems, 1 seed: the accuracy band at p ~ 0.6 is 2 * sqrt(2 * 0.24 / 500) ~ 0.062.
  tab = _tab({"egrc": (0.60, 0.30), "ee": (0.59, 0.31), "reverse": (0.45, 0.50)})
  ee, rev = report.comparisons(tab, 1, 500)
  assert ee["as_accurate"] and ee["as_short"] and "does as well as EGRC" in ee["text"]
  tab = _tab({"egrc": (0.60, 0.30), "ee": (0.60, 0.25), "reverse": (0.70, 0.31)})
  assert all("does better than EGRC" in c["text"] for c in report.comparisons(tab, 1, 500))
  assert not rev["as_accurate"] and not rev["as_short"]
  assert "less accurate and longer than EGRC" in rev["text"]
  tab = _tab({"egrc": (0.60, 0.30), "ee": (0.80, 0.60), "reverse": (0.60, 0.33)})
  ee, rev = report.comparisons(tab, 1, 500)
  assert "trades length for accuracy" in ee["text"]
  assert rev["as_accurate"] and not rev["as_short"] and "is longer than EGRC" in rev["text"]


def test_verdicts_and_spread():
  tab = {
    "egrc": {"length_ratio": report.spread([0.3, 0.34, 0.32]),
             "accuracy": report.spread([0.6, 0.62, 0.64])},
    "sft": {"accuracy": report.spread([0.6, 0.61, 0.62])},
  }  # fmt: skip
  assert tab["egrc"]["length_ratio"]["std"] == pytest.approx(0.02)
  ratio, acc, protocol = report.verdicts(tab, num_seeds=3, num_test=500)
  assert ratio["met"] and acc["met"] and protocol["met"]
  # One seed (the main command) does not check the 3-seed target: not "not met".
  one = report.verdicts(tab, num_seeds=1, num_test=500)[2]
  assert one["met"] is None and report.status(one) == "not checked" and "--seeds" in one["text"]
  assert report.verdicts(tab, num_seeds=3, num_test=50)[2]["met"] is False


def test_ee_star_and_the_conflict_diagnostics(quick_run):
  workdir, rep = quick_run
  seed = rep["seeds"]["0"]
  # EE* = EE trained for EGRC's budget (2 + 2 steps in quick mode) plus 50%.
  assert seed["rl_results"]["ee_star"]["global_step"] == 6
  assert seed["rl_results"]["egrc"]["global_step"] == 4
  d = seed["conflict"]
  assert d["num_problems"] == 4 and d["group_size"] == 4
  assert set(d["objectives"]) == {"compression", "accuracy"}
  for o in d["objectives"].values():
    assert math.isfinite(o["connector_grad_mean"]) and -1 <= o["pearson_r"] <= 1
  md = (workdir / "report.md").read_text()
  assert "## Entropy conflict at the SFT model" in md and "| EE* |" in md
  for name in ("selected_samples", "entropy_grad_compression", "entropy_grad_accuracy"):
    assert (workdir / d["plots"] / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_pipeline_arms_are_checked():
  from egrc_jax.trainer.config import load_config_spec

  for bad in ("ee+reverse", "egrc+egrc", "egrc+eee"):
    with pytest.raises(ValueError, match="pipeline.arms"):
      toy_plan.toy_plan(load_config_spec(f"{ROOT}/configs/toy.py:pipeline.arms={bad}"))
  for bad in ("pipeline.ee_star_factor=0", "pipeline.conflict_prompts=-1"):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
      toy_plan.toy_plan(load_config_spec(f"{ROOT}/configs/toy.py:{bad}"))
  c = load_config_spec(f"{ROOT}/configs/toy.py:conflict")
  a = toy_plan.arm_config(c, "ee_star", 3, "/tmp/x")
  assert a.arm == "ee" and a.single.steps == 120 and a.seed == 3  # 1.5 x (40 + 40)
  assert toy_plan.arm_config(c, "ee", 3, "/tmp/x").single.steps == 80
  with pytest.raises(ValueError, match="unknown toy arm"):
    toy_plan.arm_config(c, "nope", 0, "/tmp/x")


def test_a_rerun_reads_each_seeds_cached_result(quick_run, capsys):
  workdir, rep = quick_run
  saved = json.loads((workdir / "seed0" / "seed_result.json").read_text())
  assert saved["result"] == json.loads(json.dumps(rep["seeds"]["0"]))
  capsys.readouterr()
  again = pipeline.main([
    "--workdir", str(workdir), "--seeds=0",
    f"--config={ROOT}/configs/toy.py:quick,pipeline.arms=egrc+ee_star+reverse,"
    "pipeline.conflict_prompts=4",
  ])  # fmt: skip
  out = capsys.readouterr().out
  assert "seed 0: every phase done with these settings" in out
  assert "RL arm" not in out and "evaluation" not in out  # no phase ran again
  assert json.loads(json.dumps(again["table"])) == json.loads(json.dumps(rep["table"]))


def test_the_seed_cache_key_ignores_only_the_seed_list():
  from egrc_jax.trainer.config import load_config_spec

  def plan(spec, seeds):
    p = toy_plan.toy_plan(load_config_spec(f"{ROOT}/configs/toy.py:{spec}"))
    return dataclasses.replace(p, pipeline=dataclasses.replace(p.pipeline, seeds=seeds))

  key = pipeline.seed_key(plan("conflict", (3,)))
  assert key == pipeline.seed_key(plan("conflict", (3, 4, 5)))
  for changed in ("rollout.max_new_tokens=300", "pipeline.arms=egrc",
                  "pipeline.conflict_prompts=7", "task.start_max=20"):  # fmt: skip
    assert pipeline.seed_key(plan(f"conflict,{changed}", (3,))) != key, changed
