"""The RL loop end to end on the tiny config: every arm, stage switching, exact resume,
SIGTERM, non-finite updates, and bad input."""

import dataclasses
import json
import os
import pathlib
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from egrc_jax.trainer import branch
from egrc_jax.trainer import config as config_lib
from egrc_jax.trainer.checkpoint import (
  CheckpointError,
  check_writable,
  latest_complete_step,
  read_meta,
  restore_params,
)
from egrc_jax.trainer.loop import NonFiniteError, Trainer
from egrc_jax.trainer.plan import SwitchConfig, build_plan
from egrc_jax.trainer.switch import EntropySwitch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small enough to run each arm in seconds: 4 prompts x 2 samples, 8 new tokens.
FAST = (
  "data.prompts_per_step=4,rollout.num_samples=2,rollout.max_new_tokens=8,"
  "data.max_prompt_tokens=256,rollout.prompt_buckets=256,optim.micro_batch_rows=4,"
  "eval.num_prompts=4,eval.max_new_tokens=16,checkpoint.every=1,compress.steps=2,enhance.steps=2,"
  "single.steps=2,"
  "grading.mode=exact,export.hf=false"
)


def tiny(overrides: str = "", data_root=None):
  arg = FAST + ("," + overrides if overrides else "")
  c = config_lib.load_config_file(str(ROOT / "configs" / "tiny.py"), arg)
  if data_root is not None:
    c.unlock()
    c.data.data_root = str(data_root)
    c.lock()
  return c


def read_metrics(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "loss" in r], [r for r in rows if "event" in r]


@pytest.mark.parametrize("arm", config_lib.ARMS)
def test_each_arm_runs_with_finite_metrics(arm, tmp_path, shared_data):
  c = tiny(f"arm={arm}", shared_data)
  result = Trainer(c, str(tmp_path)).run()
  steps, events = read_metrics(tmp_path)
  n_stages = 2 if arm in ("egrc", "reverse") else 1
  assert result["global_step"] == len(steps) == 2 * n_stages
  for row in steps:
    for key in (
      "loss",
      "grad_norm",
      "entropy/mean",
      "reward/total",
      "length/mean",
      "entropy/at_temperature",
      "sampler_learner/max_abs_logp_diff",
      "time/rollout",
      "time/update",
    ):
      assert np.isfinite(row[key]), (arm, key, row[key])
    # Loss-weighted means exist when some token has weight (a random model earns no reward,
    # so positive-only stage 1 trains on nothing: NaN there, never a made-up 0).
    if row["advantage/kept_share"] > 0:
      assert np.isfinite(row["loss_weighted/clip_frac"]), (arm, row)
    else:
      assert row["loss_weighted/clip_frac"] == "nan"
    assert row["finite"]
  begins = [e for e in events if e["event"].endswith("begins")]
  assert len(begins) == n_stages
  if n_stages == 2:
    assert result["switch_steps"] == [2]
    assert [r["stage"] for r in steps] == (
      ["compress"] * 2 + ["enhance"] * 2 if arm == "egrc" else ["enhance"] * 2 + ["compress"] * 2
    )
    assert [r["temperature"] for r in steps] == (
      [0.6, 0.6, 1.0, 1.0] if arm == "egrc" else [1.0, 1.0, 0.6, 0.6]
    )


def test_lr_schedule_is_sized_in_rl_steps_with_ppo_epochs(tmp_path, shared_data):
  # Two PPO epochs per step used to advance the schedule twice per RL step (warmup over in
  # half its steps, the cosine at its floor half-way): every epoch of a step shares its lr.
  from egrc_jax.train import OptimConfig, lr_schedule

  c = tiny("arm=grpo,single.steps=4,optim.ppo_epochs=2,optim.warmup_steps=2", shared_data)
  Trainer(c, str(tmp_path)).run()
  rows, _ = read_metrics(tmp_path)
  o = c.optim
  sched = lr_schedule(OptimConfig(lr=o.lr, warmup_steps=2, min_lr_ratio=0.1), total_steps=4)
  # lr (t+1)/2 for t < 2, then cosine from lr to 0.1 lr over steps 2..3.
  assert [r["optim/lr"] for r in rows] == [sched(t) for t in range(4)]
  assert [r["optim/lr"] for r in rows][:2] == [o.lr / 2, o.lr]


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_filtered_rollouts_and_old_logprobs(mode, tmp_path, shared_data):
  # top_p 0.5 on a near-uniform random model keeps about half the mass, so the sampler's
  # log q exceeds the learner's log p_T by -log(kept mass): with the sampler's old logprobs
  # the ratio starts well below 1; recomputed by the learner ("auto" with a filter) it is 1.
  c = tiny(f"arm=grpo,rollout.top_p=0.5,rollout.recompute_old_logprobs={mode}", shared_data)
  Trainer(c, str(tmp_path)).run()
  rows, _ = read_metrics(tmp_path)
  first = rows[0]
  if mode == "auto":
    assert abs(first["loss_weighted/ratio"] - 1.0) < 1e-4  # two compiled programs: rounding
    assert all(r["time/old_logprobs"] > 0 for r in rows)
  else:
    assert first["loss_weighted/ratio"] < 0.8
    assert all(r["time/old_logprobs"] == 0 for r in rows)
  for r in rows:  # the sampler's log p_T against the learner's, on-policy: float32 rounding
    assert r["sampler_learner/max_abs_logp_diff"] < 1e-4
    assert r["sampler_learner/prob_pearson"] > 0.9999


def test_entropy_at_the_sampling_temperature_is_a_plain_mean(tmp_path, shared_data):
  # entropy/at_temperature comes from the rollout, over every completion token, in both
  # stages; at T = 1 (enhance) it is the T = 1 entropy itself.
  c = tiny("arm=egrc,compress.temperature=0.5", shared_data)
  Trainer(c, str(tmp_path)).run()
  rows, _ = read_metrics(tmp_path)
  for r in rows:
    assert np.isfinite(r["entropy/at_temperature"])
    if r["stage"] == "enhance":
      assert r["entropy/at_temperature"] == r["entropy/mean"]
    else:  # sharper at T = 0.5
      assert r["entropy/at_temperature"] < r["entropy/mean"]


def test_entropy_switch_rule():
  sw = EntropySwitch(window=2, min_drop=0.05, min_steps=3)
  # Compares the mean of the last 2 steps with the mean of the 2 before (needs 4 steps):
  # step 4: 0.95 -> 0.75 (drop 21%), 5: 0.85 -> 0.7 (18%), 6: 0.75 -> 0.7 (6.7%),
  # step 7: 0.7 -> 0.7 (0% < 5%: switch).
  entropies = (1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7)
  assert [sw.update(h) for h in entropies] == [False] * 6 + [True]
  restored = EntropySwitch.from_state(SwitchConfig(2, 0.05, 3), sw.state())
  assert restored.state() == sw.state()


def test_entropy_triggered_switch_is_logged(tmp_path, shared_data):
  # A random tiny model's entropy is flat, so the switch fires at min_steps.
  c = tiny("switch.mode=entropy,switch.window=1,switch.min_steps=2,compress.steps=5", shared_data)
  result = Trainer(c, str(tmp_path)).run()
  _, events = read_metrics(tmp_path)
  assert any("entropy stopped descending" in e["event"] for e in events)
  assert result["switch_steps"] == [2]
  assert result["global_step"] == 4  # 2 compress (switched early) + 2 enhance


def _final_params(workdir, c=None):
  """(params, meta) of the workdir's latest checkpoint, read as evaluation reads it."""
  step = latest_complete_step(str(workdir))
  step_dir = pathlib.Path(workdir) / "checkpoints" / str(step)
  _, model = restore_params(step_dir)
  return jax.device_get(nnx.state(model, nnx.Param)), read_meta(step_dir)


def test_resume_is_bitwise_exact(tmp_path, shared_data):
  full, split = tmp_path / "full", tmp_path / "split"
  Trainer(tiny("", shared_data), str(full)).run()
  first = Trainer(tiny("run_steps=1", shared_data), str(split)).run()
  assert first["stopped_early"] == "run_steps" and first["global_step"] == 1
  second = Trainer(tiny("run_steps=2", shared_data), str(split)).run()  # crosses the switch
  assert second["global_step"] == 3
  Trainer(tiny("", shared_data), str(split)).run()
  rows_full, _ = read_metrics(full)
  rows_split, _ = read_metrics(split)
  assert [r["step"] for r in rows_split] == [1, 2, 3, 4]
  for a, b in zip(rows_full, rows_split, strict=True):
    for key in ("loss", "grad_norm", "reward/total", "length/mean", "entropy/mean"):
      assert a[key] == b[key], (a["step"], key)
  pa, _ = _final_params(full, tiny("", shared_data))
  pb, _ = _final_params(split, tiny("", shared_data))
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_a_restorable_checkpoint(tmp_path, shared_data, monkeypatch):
  c = tiny("checkpoint.every=100", shared_data)
  trainer = Trainer(c, str(tmp_path))
  original = trainer.ctx.writer.write

  def write_then_preempt(step, metrics):
    original(step, metrics)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # what a TPU preemption notice delivers

  monkeypatch.setattr(trainer.ctx.writer, "write", write_then_preempt)
  result = trainer.run()
  assert result == {"stopped_early": "sigterm", "global_step": 1}
  assert latest_complete_step(str(tmp_path)) == 1
  resumed = Trainer(tiny("", shared_data), str(tmp_path)).run()
  assert resumed["global_step"] == 4


def test_non_finite_updates_are_skipped_then_stop(tmp_path, shared_data, monkeypatch):
  from egrc_jax.trainer import batch as batch_lib

  real = batch_lib.advantages
  monkeypatch.setattr(
    batch_lib,
    "advantages",
    lambda stage, rewards: (real(stage, rewards)[0] * np.nan, np.ones_like(rewards.total_PG, bool)),
  )
  c = tiny("optim.max_bad_steps=2,compress.steps=5", shared_data)  # checkpoint.every=1
  trainer = Trainer(c, str(tmp_path))
  before = jax.tree.map(np.array, trainer.params)
  with pytest.raises(NonFiniteError, match="2 consecutive non-finite"):
    trainer.run()
  # The checkpoint after the first skipped update holds the starting params, untouched.
  after, meta = _final_params(tmp_path)
  assert meta["global_step"] == 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  _, events = read_metrics(tmp_path)
  assert sum("update skipped" in e["event"] for e in events) == 2


def test_unknown_key_and_arm_are_refused():
  with pytest.raises(KeyError, match="unknown config key 'compress.rr'"):
    tiny("compress.rr=0.3")
  with pytest.raises(ValueError, match="arm='fast' does not exist"):
    tiny("arm=fast")
  with pytest.raises(ValueError, match="is not key=value"):
    tiny("arm")


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, shared_data):
  Trainer(tiny("run_steps=1", shared_data), str(tmp_path)).run()
  ckpt_dir = tmp_path / "checkpoints"
  before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt_dir.rglob("*"))
  with pytest.raises(
    CheckpointError, match="different model.*hidden_size: checkpoint 64 vs run 32"
  ):
    Trainer(tiny("model.hidden_size=32", shared_data), str(tmp_path)).run()
  assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt_dir.rglob("*")) == before


def test_unwritable_workdir_is_refused(tmp_path, shared_data):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError, match="cannot be created: .*a_file is not a directory"):
    Trainer(tiny("", shared_data), str(blocker / "run"))


def test_processes_sharing_a_workdir_probe_it_without_racing(tmp_path, monkeypatch):
  # launch/local.sh runs every process of a run on one host with one workdir. Between this
  # process writing its probe and removing it, a second process probes the same folder; with
  # one shared probe name the second removed the first's and the first failed (CI, 2026-12-08).
  real_write, pid = pathlib.Path.write_text, os.getpid()

  def write_then_other_process_probes(self, *args, **kwargs):
    out = real_write(self, *args, **kwargs)
    if os.getpid() == pid:
      monkeypatch.setattr(os, "getpid", lambda: pid + 1)
      check_writable(str(tmp_path / "run"))
      monkeypatch.setattr(os, "getpid", lambda: pid)
    return out

  monkeypatch.setattr(pathlib.Path, "write_text", write_then_other_process_probes)
  check_writable(str(tmp_path / "run"))
  assert list((tmp_path / "run").iterdir()) == []


def test_docs_list_every_config_key():
  assert config_lib.doc_table() in (ROOT / "docs" / "config.md").read_text()


@pytest.mark.parametrize("name", ["tiny", "r1_distill_1p5b", "r1_distill_7b"])
def test_config_files_load(name):
  c = config_lib.load_config_file(str(ROOT / "configs" / f"{name}.py"), "arm=ee")
  assert c.arm == "ee" and c.model.preset in ("tiny", name)


def test_kl_to_the_frozen_reference(tmp_path, shared_data):
  # The entropy bonus moves the policy even though a random model earns no reward; the
  # reference stays at the starting params, so KL is 0 at step 1 and positive after.
  c = tiny(
    "arm=grpo,loss.kl_kind=k3,single.kl_coef=0.1,loss.entropy_coef=0.5,optim.lr=1e-2", shared_data
  )
  Trainer(c, str(tmp_path)).run()
  rows, _ = read_metrics(tmp_path)
  assert abs(rows[0]["loss_weighted/kl"]) < 1e-6
  assert rows[1]["loss_weighted/kl"] > 1e-6
  assert all(r["time/reference"] > 0 for r in rows)


def test_kl_in_stage_two_only(tmp_path, shared_data):
  # enhance.kl_coef gives stage 2 its own KL weight; stage 1's compress.kl_coef is 0, so it
  # has no KL term and computes no reference logprobs. (A random model earns no reward, so
  # positive-only stage 1 leaves the params at the reference; the entropy bonus moves them in
  # stage 2, so its KL is 0 at its first step and positive after.)
  c = tiny(
    "arm=egrc,loss.kl_kind=k3,enhance.kl_coef=0.1,loss.entropy_coef=0.5,optim.lr=1e-2",
    shared_data,
  )
  Trainer(c, str(tmp_path)).run()
  rows, _ = read_metrics(tmp_path)
  s1 = [r for r in rows if r["stage"] == "compress"]
  s2 = [r for r in rows if r["stage"] == "enhance"]
  assert len(s1) == len(s2) == 2
  # (no row gets gradient in stage 1 here, so its weighted KL mean is NaN, not a KL of 0)
  assert all(r["loss_weighted/kl"] in (0.0, "nan") and r["time/reference"] == 0.0 for r in s1)
  assert all(r["time/reference"] > 0 for r in s2)
  assert abs(s2[0]["loss_weighted/kl"]) < 1e-6 < s2[1]["loss_weighted/kl"]


def test_stage_kl_weights():
  # Each stage's KL weight is its own key (no inheritance); 0 means no KL term and no
  # reference logprobs, whatever loss.kl_kind says.
  plan = build_plan(tiny("arm=egrc,loss.kl_kind=k3,compress.kl_coef=0.0,enhance.kl_coef=0.2"))
  s1, s2 = plan.stages
  assert (s1.loss.kl_kind, s1.loss.kl_coef) == (None, 0.0)
  assert (s2.loss.kl_kind, s2.loss.kl_coef) == ("k3", 0.2)
  (ee,) = build_plan(tiny("arm=ee,loss.kl_kind=k3,single.kl_coef=0.04")).stages
  assert (ee.loss.kl_kind, ee.loss.kl_coef) == ("k3", 0.04)
  with pytest.raises(ValueError, match=r"enhance.kl_coef=0.1 > 0 but loss.kl_kind='none'"):
    tiny("enhance.kl_coef=0.1")
  with pytest.raises(ValueError, match=r"compress.kl_coef=-1.0 must be >= 0"):
    tiny("compress.kl_coef=-1")


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, shared_data):
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast

  vocab = {f"w{i}": i for i in range(400)}  # the tiny preset's embedding table has 272 rows
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "w0")),
                                eos_token="w1", pad_token="w2")  # fmt: skip
  tok.save_pretrained(tmp_path / "tok")
  c = tiny(f"model.tokenizer_path={tmp_path / 'tok'}", shared_data)
  with pytest.raises(ValueError, match="400 tokens but the model's vocab_size is 272"):
    Trainer(c, str(tmp_path / "run"))


def test_branch_continues_exactly_or_with_new_settings(tmp_path, shared_data):
  src = tmp_path / "src"
  Trainer(tiny("checkpoint.keep=10", shared_data), str(src)).run()  # 2 + 2 steps
  before = (src / "metrics.jsonl").read_text()
  rows_src, _ = read_metrics(src)
  # Same settings: the branch at the stage boundary continues exactly as the source did.
  same = branch.branch(src, 2, tmp_path / "same")
  Trainer(tiny("", shared_data), str(same)).run()
  rows, events = read_metrics(same)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for a, b in zip(rows_src, rows, strict=True):
    for key in ("loss", "grad_norm", "reward/total", "length/mean", "entropy/mean"):
      assert a[key] == b[key], (a["step"], key)
  begins = [e for e in events if e["event"] == "stage enhance begins"]
  assert [e["step"] for e in begins] == [2]  # logged once, by the resumed run
  assert sum(e["event"].startswith("branched from") for e in events) == 1
  # Changed stage-2 settings apply from the branch point on; stage 1 is the source's.
  hot = branch.branch(src, 2, tmp_path / "hot")
  Trainer(tiny("enhance.temperature=1.5", shared_data), str(hot)).run()
  rows, events = read_metrics(hot)
  assert [r["temperature"] for r in rows] == [0.6, 0.6, 1.5, 1.5]
  assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in rows_src[:2]]
  assert [e["temperature"] for e in events if e["event"] == "stage enhance begins"] == [1.5]
  assert (src / "metrics.jsonl").read_text() == before  # the source is only read


def test_branch_metrics_rows():
  rows = [
    {"step": 1, "loss": 0.1},
    {"step": 2, "loss": 0.2},
    {"step": 2, "eval/compress/accuracy": 0.5},
    {"step": 2, "event": "stage enhance begins"},
    {"step": 2, "event": "resumed"},
    {"step": 3, "loss": 0.3},
    {"step": 3, "event": "run finished"},
  ]
  lines = [json.dumps(r) + "\n" for r in rows] + ['{"step": 4, "lo']  # a torn last line
  kept = [json.loads(x) for x in branch.branch_metrics(lines, 2)]
  assert kept == [rows[0], rows[1], rows[2], rows[4]]


def test_branch_refuses_bad_input(tmp_path):
  run = tmp_path / "run"
  with pytest.raises(branch.BranchError, match="local directories"):
    branch.branch("gs://bucket/run", 2, tmp_path / "b")
  with pytest.raises(branch.BranchError, match="not a directory"):
    branch.branch(run, 2, tmp_path / "b")
  (run / "checkpoints" / "3" / "state").mkdir(parents=True)  # never committed
  with pytest.raises(branch.BranchError, match="no complete checkpoint"):
    branch.branch(run, 3, tmp_path / "b")
  (run / "checkpoints" / "2" / "state").mkdir(parents=True)
  (run / "checkpoints" / "2" / "commit_success.txt").write_text("")
  with pytest.raises(branch.BranchError, match=r"step 3 .*available: \[2\]"):
    branch.branch(run, 3, tmp_path / "b")
  full = tmp_path / "full"
  full.mkdir()
  (full / "notes.txt").write_text("keep me")
  with pytest.raises(branch.BranchError, match="not empty"):
    branch.branch(run, 2, full)
  assert (full / "notes.txt").read_text() == "keep me"
  with pytest.raises(branch.BranchError, match="must differ"):
    branch.branch(run, 2, run)
  with pytest.raises(branch.BranchError, match="available"):
    branch.main(["--source", str(run), "--step", "7", "--dest", str(tmp_path / "c")])
  out = branch.branch(run, 2, tmp_path / "ok")
  assert (out / "checkpoints" / "2" / "commit_success.txt").is_file()
  assert not (out / "checkpoints" / "3").exists()


def test_every_reward_setting_is_a_config_key():
  # Each RewardConfig field of a stage comes from a config key (no hidden defaults): set
  # every one to a non-default value and find it in the stage's plan.
  c = tiny(
    "arm=baseline,single.reward=dapo_overlong,single.clip_truncated=false,single.kimi_weight=0.3,"
    "single.sb_correct_weight=3.0,single.sb_beta=0.01,single.dapo_scale=0.5,"
    "single.dapo_signed=false,single.az_alpha=0.2,single.l1_alpha=0.001,single.n_target=6,"
    "single.buffer=3,single.r=0.25,single.w_len=0.7,single.shaping=linear"
  )
  (stage,) = build_plan(c).stages
  want = dict(clip_truncated=False, kimi_weight=0.3, sb_correct_weight=3.0, sb_beta=0.01,
              dapo_scale=0.5, dapo_signed=False, az_alpha=0.2, l1_alpha=0.001, n_target=6,
              buffer=3, r=0.25, w_len=0.7, shaping="linear", name="dapo_overlong",
              max_len=8)  # fmt: skip
  assert {f.name for f in dataclasses.fields(stage.reward)} == set(want)
  assert {k: getattr(stage.reward, k) for k in want} == want
  s1, s2 = build_plan(
    tiny(
      "arm=egrc,compress.clip_truncated=false,enhance.clip_truncated=false,enhance.shaping=linear"
    )
  ).stages
  assert not s1.reward.clip_truncated and not s2.reward.clip_truncated
  assert s2.reward.shaping == "linear"


def test_one_connector_list_per_task():
  from egrc_jax.analysis.__main__ import parser
  from egrc_jax.toy import task

  toy = config_lib.load_config_file(str(ROOT / "configs" / "toy.py"))
  # The toy's training metrics count the words its evaluation counts (task.CONNECTORS) ...
  assert tuple(toy.log.connectors) == task.CONNECTORS
  # ... and the analysis commands default to the trainer's list.
  args = parser().parse_args(["high_entropy_tokens", "--samples", "x", "--out", "y"])
  assert tuple(args.connectors.split(",")) == config_lib.CONNECTORS


def test_a_rerun_of_a_finished_run_holds_its_final_params(tmp_path, shared_data):
  # Re-running a finished run used to leave the trainer on the *starting* params, which
  # main then exported as hf_final: the SFT model reported as the RL model.
  c = tiny("arm=grpo,loss.entropy_coef=0.5,optim.lr=1e-2", shared_data)
  first = Trainer(c, str(tmp_path))
  first.run()
  trained = jax.tree.map(np.asarray, nnx.state(first.model, nnx.Param))
  again = Trainer(tiny("arm=grpo,loss.entropy_coef=0.5,optim.lr=1e-2", shared_data), str(tmp_path))
  start = jax.tree.map(np.asarray, nnx.state(again.model, nnx.Param))
  result = again.run()
  assert result["already_finished"] and result["global_step"] == 2
  final = jax.tree.map(np.asarray, nnx.state(again.model, nnx.Param))
  pairs = zip(jax.tree.leaves(trained), jax.tree.leaves(start), strict=True)
  moved = max(np.abs(a - b).max() for a, b in pairs)
  assert moved > 0  # the run did train
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(final), strict=True):
    np.testing.assert_array_equal(a, b)


# Keys that configure the run around the plan (model, mesh, grading, files), read once by
# trainer/setup.py or the loop, not by build_plan.
OUTSIDE_THE_PLAN = ("model.", "mesh.", "grading.", "checkpoint.", "log.", "export.", "run_steps")


def test_every_plan_key_reaches_the_plan():
  # Perturb each numeric / boolean key: some arm's RunPlan must change. A key that reaches
  # nothing is a hidden no-op (or a setting some other place decodes on its own).
  base = tiny("")
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(v, f"{prefix}{k}.")
      else:
        flat[prefix + k] = v

  walk(base, "")
  plans = lambda c: [build_plan(_with(c, "arm", a)) for a in config_lib.ARMS]
  ref = plans(base)
  unused = []
  for key, value in sorted(flat.items()):
    if key.startswith(OUTSIDE_THE_PLAN) or not isinstance(value, bool | int | float):
      continue
    new = (
      (not value) if isinstance(value, bool) else value + (1 if isinstance(value, int) else 0.013)
    )
    if key == "switch.mode" or (key == "optim.micro_batch_rows" and new):
      new = 8  # a divisor of the 8-row batch
    try:
      changed = plans(_with(base, key, new)) != ref
    except ValueError:
      changed = True  # refused: the plan reads it
    if not changed:
      unused.append(key)
  # switch.*: only with switch.mode=entropy; checked there.
  assert [k for k in unused if not k.startswith("switch.")] == []
  entropy = _with(base, "switch.mode", "entropy")
  for key in ("switch.window", "switch.min_drop", "switch.min_steps"):
    assert build_plan(_with(entropy, key, flat[key] + 1)) != build_plan(entropy), key


def _with(c, key: str, value):
  c = c.copy_and_resolve_references()
  c.unlock()
  node = c
  *parents, name = key.split(".")
  for p in parents:
    node = node[p]
  node[name] = value
  return c


class _LengthGrader:
  """A grader whose verdict is a function of the row alone: correct when the completion's
  length is even (so batching can only change it by changing the row)."""

  def grade_rollout(self, rollout, golds):
    assert len(golds) == rollout.lengths_B.shape[0]
    return np.asarray(rollout.lengths_B) % 2 == 0


def test_evaluation_in_padded_batches_equals_one_call():
  # 7 prompts in batches of 3 (the last padded with 2 repeats, their rows dropped) give the
  # same greedy rows, so the same metrics, as one call over all 7.
  from flax import nnx

  from egrc_jax.model import get_preset
  from egrc_jax.sampler import SamplingConfig
  from egrc_jax.sharding import init_model
  from egrc_jax.trainer.plan import EvalPlan
  from egrc_jax.trainer.step import evaluate_policy

  graphdef, params = nnx.split(init_model(get_preset("tiny"), seed=0))
  rng = np.random.default_rng(0)
  examples = [
    {"prompt_ids": rng.integers(1, 200, size=int(n)).tolist(), "gold": "x"}
    for n in rng.integers(3, 12, size=7)
  ]
  sampling = SamplingConfig(
    greedy=True, max_new_tokens=12, stop_token_ids=(3,), pad_id=0, prompt_buckets=(16,),
    loop="lockstep",
  )  # fmt: skip
  one = EvalPlan(0, 7, 2, sampling)
  batched = EvalPlan(0, 7, 2, sampling, batch_prompts=3)
  assert batched.batches(7) == [(0, 3), (3, 6), (6, 7)]
  a = evaluate_policy(one, examples, graphdef, params, _LengthGrader(), seed=0)
  b = evaluate_policy(batched, examples, graphdef, params, _LengthGrader(), seed=0)
  assert a == b
  assert 0 < a["length"] <= 12


def test_negative_eval_batch_prompts_is_refused():
  with pytest.raises(ValueError, match="eval.batch_prompts=-1"):
    tiny("eval.batch_prompts=-1")
