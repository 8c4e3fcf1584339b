"""egrc_jax.evaluate and egrc_jax.release: scores, the end-to-end CLI on the real benchmark
files with a tiny random model, resuming, trainer checkpoints, and the release directory."""

import json
import math

import numpy as np
import optax
import pytest
import torch
from flax import nnx
from tiny_hf_model import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from egrc_jax import train
from egrc_jax.data import chat
from egrc_jax.evaluate import (
  average,
  benchmark_summary,
  model_io,
  pass_at_1,
  read_samples,
  restore_params,
)
from egrc_jax.evaluate import runner as eval_runner
from egrc_jax.evaluate.__main__ import main as eval_main
from egrc_jax.grading import extract_answer
from egrc_jax.release import release
from egrc_jax.sampler import SamplingConfig, completion_lists, generate
from egrc_jax.sharding import make_mesh
from egrc_jax.trainer.checkpoint import Checkpointer, json_model_config

BENCHES = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k")
# One prompt bucket that holds the first two problems of every benchmark (<= 640 byte tokens):
# a single compile of the sampler for the whole run.
FLAGS = ["--n=2", "--max_new_tokens=8", "--batch_prompts=2", "--prompt_buckets=1024",
         "--grader_workers=1", "--save_token_entropy"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


def _params(model) -> dict:
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# -- scores ------------------------------------------------------------------------------------
def test_pass_at_1_and_standard_error_by_hand():
  # Per-problem accuracies 3/4, 0, 1: mean 7/12; deviations 1/6, -7/12, 5/12;
  # sample variance (1/36 + 49/144 + 25/144) / 2 = 78/288; SE = sqrt(78/288 / 3).
  acc, se = pass_at_1([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
  assert acc == pytest.approx(7 / 12, abs=1e-12)
  assert se == pytest.approx(math.sqrt(78 / 288 / 3), abs=1e-12)
  assert pass_at_1([[1, 0]]) == (0.5, None)  # one problem: no spread to estimate


def test_benchmark_summary_ratio_and_average():
  rec = lambda pid, s, c, n, t=False: dict(id=pid, sample=s, correct=c, num_tokens=n, truncated=t)
  records = [rec("a", 0, True, 10), rec("a", 1, False, 30, True), rec("b", 0, True, 20),
             rec("b", 1, True, 40)]  # fmt: skip
  s = benchmark_summary(records, {"mean_tokens": 50.0, "pass@1": 0.5})
  assert s["pass@1"] == pytest.approx(0.75)  # (1/2 + 1) / 2
  assert s["stderr"] == pytest.approx(0.25)  # std([.5, 1], ddof=1) = sqrt(.125); / sqrt(2)
  assert s["mean_tokens"] == 25.0 and s["truncation_rate"] == 0.25
  assert s["length_ratio"] == pytest.approx(0.5)
  avg = average({"x": s, "y": {**s, "pass@1": 0.25, "stderr": 0.1, "length_ratio": 1.0}})
  assert avg["pass@1"] == pytest.approx(0.5)
  assert avg["stderr"] == pytest.approx(math.sqrt(s["stderr"] ** 2 + 0.01) / 2)
  assert avg["length_ratio"] == pytest.approx(0.75)


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_run(tiny_model, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval")
  args = [f"--model={tiny_model}", f"--workdir={out}", *FLAGS]
  # The tiny tokenizer's prompt ends with "<|assistant|><think>\n": the runner must tell the
  # extraction so (a response without </think> has no answer). Recorded on the first run.
  think_open_seen = []

  def spy(response, think_open=False):
    think_open_seen.append(think_open)
    return extract_answer(response, think_open)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(eval_runner, "extract_answer", spy)
    assert eval_main([*args, "--limit=1"]) == 0
  assert len(think_open_seen) == 12 and all(think_open_seen)  # 6 benchmarks x 1 problem x n=2
  first = read_samples(out / "samples.jsonl")
  # Interrupt: cut the last line in half (its problem is now incomplete).
  path = out / "samples.jsonl"
  data = path.read_bytes()
  cut = data.rstrip(b"\n").rfind(b"\n") + 1
  path.write_bytes(data[: cut + (len(data) - cut) // 2])
  assert eval_main([*args, "--limit=2"]) == 0
  return out, args, first


def test_end_to_end_outputs(eval_run):
  out, _, _ = eval_run
  res = json.loads((out / "results.json").read_text())
  assert set(res["benchmarks"]) == set(BENCHES)
  for name in BENCHES:
    b = res["benchmarks"][name]
    assert b["num_problems"] == 2 and b["num_samples"] == 4
    assert 0 < b["mean_tokens"] <= 8 and 0 <= b["truncation_rate"] <= 1
  assert res["average"]["num_samples"] == 24
  table = (out / "results.md").read_text()
  assert all(f"| {name} |" in table for name in BENCHES) and "**average**" in table
  records = read_samples(out / "samples.jsonl")
  assert len(records) == 24
  for r in records:
    assert 1 <= r["num_tokens"] <= 8 and len(r["token_entropy"]) == r["num_tokens"]
    assert r["entropy_max"] >= r["entropy_mean"] >= 0
    assert r["truncated"] == (r["num_tokens"] == 8 and r["token_ids"][-1] != 257)


def test_resume_generates_only_missing_problems(eval_run):
  out, _, first = eval_run
  lines = (out / "samples.jsonl").read_text().splitlines()
  assert all(json.loads(line) for line in lines)  # the partial line was cut off, not kept
  # 12 first-run records - 1 cut + 12 new (second problems) + 2 regenerated (the cut problem).
  assert len(lines) == 12 - 1 + 12 + 2
  now = {(r["benchmark"], r["id"], r["sample"]): r for r in read_samples(out / "samples.jsonl")}
  for r in first:  # every first-run sample, the regenerated one included, is unchanged
    assert now[(r["benchmark"], r["id"], r["sample"])]["text"] == r["text"]


def test_rerun_with_baseline_reuses_samples(eval_run, tmp_path):
  out, args, _ = eval_run
  base = tmp_path / "baseline.json"
  res = json.loads((out / "results.json").read_text())
  for b in res["benchmarks"].values():
    b["mean_tokens"] *= 2
  base.write_text(json.dumps(res))
  before = (out / "samples.jsonl").read_bytes()
  assert eval_main([*args, "--limit=2", f"--baseline={base}"]) == 0
  assert (out / "samples.jsonl").read_bytes() == before  # nothing regenerated
  new = json.loads((out / "results.json").read_text())
  assert all(b["length_ratio"] == pytest.approx(0.5) for b in new["benchmarks"].values())
  with pytest.raises(ValueError, match="other settings"):
    eval_main([*args, "--limit=2", "--temperature=1.0"])


# -- trainer checkpoints and release -----------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_workdir(tiny_model, tmp_path_factory):
  """A trainer-shaped workdir: checkpoints/<step>/{state, meta} and config.json."""
  wd = tmp_path_factory.mktemp("run")
  cfg, model = model_io.load(tiny_model)[1:]
  state, _ = train.init_state_sharded(nnx.state(model, nnx.Param), optax.adamw(1e-3), None)
  ck = Checkpointer(str(wd), keep=2)
  for step in (2, 5):
    ck.save(step, state, {"model_config": json_model_config(cfg)})
  ck.close()
  (wd / "config.json").write_text(json.dumps({"model": {"tokenizer_path": tiny_model}}))
  return wd, model


def test_restore_params_from_trainer_checkpoint(trainer_workdir):
  wd, model = trainer_workdir
  src = model_io.resolve(wd)
  assert src.kind == "checkpoint" and src.path.name == "5"  # the latest step
  mesh = make_mesh(1, -1, 1)
  _, restored = restore_params(src.path, mesh)
  want, got = _params(model), _params(restored)
  (wd / "hf_final").symlink_to(src.tokenizer_dir)  # a finished run: hf_final wins
  assert model_io.resolve(wd).kind == "hf"
  (wd / "hf_final").unlink()
  assert want.keys() == got.keys()
  assert all(np.array_equal(want[k], got[k]) for k in want)


def _greedy_parity(release_dir):
  tok = AutoTokenizer.from_pretrained(release_dir)
  ids = chat.encode_prompt(tok, "What is 2 + 3?")
  theirs = AutoModelForCausalLM.from_pretrained(release_dir).eval()
  with torch.no_grad():
    gen = theirs.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
  _, cfg, ours = model_io.load(release_dir)
  scfg = SamplingConfig(greedy=True, max_new_tokens=8, stop_token_ids=(tok.eos_token_id,),
                        pad_id=tok.pad_token_id, prompt_buckets=(128,))  # fmt: skip
  mine = completion_lists(generate(ours, [ids], scfg))[0]
  assert len(mine) > 1 and gen[0, len(ids) :].tolist() == mine


@pytest.mark.parametrize("source", ["hf", "checkpoint"])
def test_release_loads_in_transformers_and_matches_greedy(
  source, tiny_model, trainer_workdir, eval_run, tmp_path
):
  run = tiny_model if source == "hf" else trainer_workdir[0]
  out = release(str(run), str(tmp_path / "rel"), str(eval_run[0]))
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen["do_sample"] is True and gen["temperature"] == 0.6 and gen["top_p"] == 0.95
  assert gen["max_new_tokens"] == 8 and gen["eos_token_id"] == 257
  card = (out / "README.md").read_text()
  assert "| gsm8k |" in card and "pass@1" in card
  assert AutoTokenizer.from_pretrained(out).chat_template
  _greedy_parity(str(out))


def test_hf_export_cli_releases_a_trainer_workdir(trainer_workdir, tmp_path):
  from egrc_jax.hf.__main__ import main as hf_cli

  out = tmp_path / "rel"
  assert hf_cli(["export", "--checkpoint", str(trainer_workdir[0]), "--out", str(out)]) == 0
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
          "tokenizer.json"} <= names  # fmt: skip
  _greedy_parity(str(out))
  from egrc_jax import cli

  assert (
    cli.run(hf_cli, ["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 2
  )


def test_model_card_usage_code_runs(tiny_model, tmp_path, capfd):
  # The card's Python block, as a user pastes it next to the release directory (with fewer
  # new tokens). It used to pass a BatchEncoding to generate(), which transformers 5 rejects.
  from test_docs import python_blocks, run_block

  out = release(str(tiny_model), str(tmp_path / "rel"))
  (code,) = python_blocks((out / "README.md").read_text())
  assert 'from_pretrained("rel")' in code
  run_block(code.replace("max_new_tokens=4096", "max_new_tokens=6"), tmp_path)
  assert capfd.readouterr().out.count("\n") >= 1  # it got as far as printing the completion
