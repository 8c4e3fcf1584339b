"""egrc_jax.analysis: every command writes its figure and numbers; hand-checked fixtures."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
from tiny_hf_model import byte_tokenizer, save_tiny_model

from egrc_jax.analysis import common, entropy_grad, high_entropy, sampling
from egrc_jax.analysis.__main__ import main as analysis_main
from egrc_jax.analysis.transitions import transitions
from egrc_jax.evaluate import append_samples


def _rec(pid, sample, correct, n, text="x", truncated=False, **kw):
  return dict(benchmark="math500", id=pid, sample=sample, correct=correct, num_tokens=n,
              text=text, truncated=truncated, entropy_mean=kw.pop("ent", 0.5), **kw)  # fmt: skip


def _write(dirpath, records, config=None):
  dirpath.mkdir(parents=True, exist_ok=True)
  append_samples(dirpath / "samples.jsonl", records)
  if config:
    (dirpath / "eval_config.json").write_text(json.dumps({"config": config}))
  return dirpath


def _outputs(out, stem):
  assert (out / f"{stem}.png").stat().st_size > 1000
  rows = list(csv.DictReader(open(out / f"{stem}.csv")))
  return rows, json.loads((out / f"{stem}.json").read_text())


def test_reasoning_steps():
  assert common.reasoning_steps("a\n\nb\n\nc</think>\n\nthe answer") == 3
  assert common.reasoning_steps("one paragraph, no tags") == 1
  assert common.reasoning_steps("<think>cut\n\noff") == 2  # unclosed: all reasoning
  assert common.reasoning_steps("") == 0


def test_transitions_groups_and_cli(tmp_path):
  a = [_rec("p1", 0, True, 100, "s\n\ns</think>"), _rec("p1", 1, True, 120),
       _rec("p2", 0, True, 90), _rec("p2", 1, False, 80),  # 0.5 >= threshold: solved
       _rec("p3", 0, False, 200), _rec("p3", 1, False, 220),
       _rec("p4", 0, False, 50), _rec("p4", 1, False, 60)]  # fmt: skip
  b = [_rec("p1", 0, True, 30), _rec("p1", 1, True, 10),
       _rec("p2", 0, False, 20), _rec("p2", 1, False, 20),
       _rec("p3", 0, True, 40), _rec("p3", 1, True, 60),
       _rec("p4", 0, False, 5), _rec("p4", 1, True, 5)]  # fmt: skip
  rows, summary = transitions(a, b)
  assert {r["id"]: r["group"] for r in rows} == {
    "p1": "preserved", "p2": "lost", "p3": "gained", "p4": "gained"
  }  # fmt: skip
  assert summary["groups"]["failed"]["count"] == 0
  p1 = next(r for r in rows if r["id"] == "p1")
  assert p1["orig_tokens"] == 110 and p1["comp_tokens"] == 20 and p1["orig_steps"] == 1.5
  out = tmp_path / "fig"
  dir_a, dir_b = _write(tmp_path / "A", a), _write(tmp_path / "B", b)
  args = ["transitions", f"--original={dir_a}", f"--compressed={dir_b}", f"--out={out}"]
  assert analysis_main(args) == 0
  csv_rows, js = _outputs(out, "transitions")
  assert len(csv_rows) == 4 and js["groups"]["gained"]["count"] == 2


def test_selected_samples_sets_and_weights(tmp_path):
  L, r = 100, 0.5
  recs = [_rec("p", 0, True, 20, ent=1.0), _rec("p", 1, True, 100, truncated=True, ent=3.0),
          _rec("p", 2, False, 50, ent=2.0), _rec("q", 0, True, 60, ent=0.5)]  # fmt: skip
  d = _write(tmp_path / "ev", recs, {"max_new_tokens": L})
  out = tmp_path / "fig"
  assert analysis_main(["selected_samples", f"--samples={d}", f"--out={out}"]) == 0
  rows, js = _outputs(out, "selected_samples")
  f = lambda n: math.exp(math.log(r) * n / L)  # exp(-lambda n), lambda = -ln(r) / L
  assert js["compression"]["count"] == 2  # correct and not truncated
  assert js["accuracy"]["count"] == 3  # correct (the truncated one included)
  want = (20 * f(20) + 60 * f(60)) / (f(20) + f(60))
  assert js["compression"]["mean_tokens"] == pytest.approx(want, rel=1e-5)  # float32 rewards
  assert js["accuracy"]["mean_entropy"] == pytest.approx((1.0 + 3.0 + 0.5) / 3)
  assert float(rows[1]["reward"]) == 0.0  # truncated: clipped to 0


def test_high_entropy_counts_by_hand():
  strings = ["wait", "the", "so", "wait", "x", "but", "the", "y", "z", "so"]
  entropy = [3.0, 0.1, 2.5, 2.9, 0.2, 1.0, 0.3, 0.1, 0.2, 0.4]
  s = high_entropy.high_entropy_counts(strings, entropy, rho=0.3, connectors=("wait", "so"))
  # k = ceil(0.3 * 10) = 3: entropies 3.0, 2.9, 2.5 -> wait, wait, so.
  assert s["counts"] == [("wait", 2), ("so", 1)] and s["num_high"] == 3
  assert s["connector_share"] == 1.0 and s["threshold"] == 2.5
  assert s["connector_share_all_tokens"] == pytest.approx(4 / 10)


def test_high_entropy_tokens_from_samples(tmp_path):
  tok_dir = tmp_path / "tok"
  byte_tokenizer().save_pretrained(tok_dir)
  rng = np.random.default_rng(0)
  recs = []
  for i in range(3):
    ids = [int(t) for t in rng.integers(65, 91, size=12)]  # bytes "A".."Z"
    recs.append(_rec(f"p{i}", 0, False, 12, token_ids=ids,
                     token_entropy=[float(x) for x in rng.random(12)]))  # fmt: skip
  d = _write(tmp_path / "ev", recs)
  out = tmp_path / "fig"
  args = ["high_entropy_tokens", f"--samples={d}", f"--tokenizer={tok_dir}", "--rho=0.25",
          "--connectors=a,b", f"--out={out}"]  # fmt: skip
  assert analysis_main(args) == 0
  rows, js = _outputs(out, "high_entropy_tokens")
  assert js["num_tokens"] == 36 and js["num_high"] == 9  # ceil(0.25 * 36), no ties
  assert sum(int(r["count"]) for r in rows) == 9
  assert all(r["string"].isalpha() and r["string"].islower() for r in rows)


def test_curves(tmp_path):
  runs = []
  for k, switch in ((0, 3), (1, 4)):
    wd = tmp_path / f"run{k}"
    wd.mkdir()
    lines = [json.dumps({"step": 0, "event": "stage compress begins"})]
    for s in range(1, 7):
      lines.append(json.dumps({"step": s, "stage": "compress" if s <= switch else "enhance",
                               "entropy/mean": 1.0 / s, "length/mean": 100 - s,
                               "accuracy": 0.1 * s}))  # fmt: skip
      if s == switch:
        lines.append(json.dumps({"step": s, "event": "stage enhance begins", "why": "fixed"}))
        lines.append(json.dumps({"step": s, "eval/compress/accuracy": 0.5}))  # stage-end eval
    (wd / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "entr')  # partial
    runs.append(wd)
  out = tmp_path / "fig"
  args = ["curves", *[f"--workdir={w}" for w in runs], "--label=A", "--label=B", f"--out={out}"]
  assert analysis_main(args) == 0
  rows, js = _outputs(out, "curves")
  assert len(rows) == 14  # 6 steps + 1 evaluation row per run
  # 6 steps per run, not 7 rows: the evaluation row shares its step's number.
  assert js["runs"]["A"]["steps"] == js["runs"]["B"]["steps"] == 6
  assert [e["step"] for e in js["runs"]["B"]["stage_switches"]] == [0, 4]


def test_pearson_matches_numpy():
  rng = np.random.default_rng(1)
  ent = rng.random((4, 6)).astype(np.float32)
  grad = (ent * 2 + rng.normal(0, 0.3, (4, 6))).astype(np.float32)
  mask = np.ones((4, 6), bool)
  mask[1, 3:] = mask[3, 5] = False
  adv = np.array([1.0, 0.0, -0.5, 2.0])
  t = entropy_grad.token_table(ent, ent, grad, adv, mask)
  # float32 sums over 20 tokens: agreement to ~1e-6.
  assert t["pearson_r"] == pytest.approx(np.corrcoef(ent[mask], grad[mask])[0, 1], abs=1e-5)
  act = mask & (adv != 0)[:, None]
  assert t["pearson_r_active"] == pytest.approx(np.corrcoef(ent[act], grad[act])[0, 1], abs=1e-5)
  assert t["num_tokens"] == 20 and t["num_active_tokens"] == 20 - 3  # row 1 (A = 0) has 3


def test_grpo_and_stage1_advantages():
  c = np.array([[True, False, True, False]])
  n = np.array([[10, 20, 100, 5]])
  tr = np.array([[False, False, True, False]])
  grpo = entropy_grad.advantages_PG("grpo", c, n, tr, max_len=100)
  # c after length clipping: [1, 0, 0, 0]: mean 1/4, population std sqrt(3)/4.
  assert grpo[0] == pytest.approx([0.75 / (math.sqrt(3) / 4 + 1e-6)] + [-0.25 / (math.sqrt(3) / 4)
                                  + 0.0] * 3, rel=1e-5)  # fmt: skip
  s1 = entropy_grad.advantages_PG("egrc_compress", c, n, tr, max_len=100, r=0.5)
  assert s1[0] == pytest.approx([0.5 ** (10 / 100), 0, 0, 0], rel=1e-6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


def test_entropy_grad_cli_and_teacher_forcing(tiny_model, tmp_path, shared_data, monkeypatch):
  flags = ["--prompts=gsm8k", f"--data_root={shared_data}", "--n=4", "--limit=2",
           "--max_new_tokens=8", "--prompt_buckets=512"]  # fmt: skip
  # A random model answers nothing right, so every advantage would be 0; random advantages
  # make the gradient norms vary and the correlation meaningful.
  real = entropy_grad.advantages_PG
  rand = lambda mode, c, *a, **k: np.random.default_rng(0).normal(size=np.shape(c))
  monkeypatch.setattr(entropy_grad, "advantages_PG", rand)
  out = tmp_path / "fig"
  assert analysis_main(["entropy_grad", f"--model={tiny_model}", *flags, f"--out={out}"]) == 0
  monkeypatch.setattr(entropy_grad, "advantages_PG", real)
  rows, js = _outputs(out, "entropy_grad")
  assert len(rows) == js["num_tokens"] > 0
  e = np.array([float(r["entropy"]) for r in rows])
  g = np.array([float(r["grad_norm"]) for r in rows])
  adv = np.array([float(r["advantage"]) for r in rows])
  assert np.ptp(g) > 0 and np.all(g <= np.abs(adv) * math.sqrt(2) + 1e-6)  # ||e_a - p|| <= sqrt 2
  # float32 reductions over ~60 tokens vs numpy float64: 1e-4.
  assert js["pearson_r"] == pytest.approx(np.corrcoef(e, g)[0, 1], abs=1e-4)
  # Teacher forcing at T = 1 reproduces the sampler's own per-token statistics: the
  # completion positions are aligned. float32, different op order: 1e-4.
  settings = sampling.SampleSettings(n=4, limit=2, max_new_tokens=8, prompt_buckets=(512,))
  model, _, _, rollout, _, _ = sampling.sample_and_grade(tiny_model, "gsm8k", settings,
                                                         str(shared_data))  # fmt: skip
  stats = sampling.teacher_forced_stats(model, rollout, 1.0)
  mask = np.asarray(rollout.completion_mask_BC)
  np.testing.assert_allclose(np.asarray(stats.entropy_BC)[mask],
                             np.asarray(rollout.entropy_BC)[mask], atol=1e-4)  # fmt: skip
  np.testing.assert_allclose(np.asarray(stats.logp_BC)[mask],
                             np.asarray(rollout.policy_logprobs_BC)[mask], atol=1e-4)  # fmt: skip
  # high_entropy_tokens from fresh samples of the model (same sampler shapes: no new compile).
  out2 = tmp_path / "fig2"
  args = ["high_entropy_tokens", f"--model={tiny_model}", *flags, "--temperature=1.0",
          f"--out={out2}"]  # fmt: skip
  assert analysis_main(args) == 0
  _, he = _outputs(out2, "high_entropy_tokens")
  assert he["num_tokens"] == int(mask.sum()) and he["num_high"] >= math.ceil(0.2 * he["num_tokens"])


def test_high_entropy_tokens_of_a_trainer_workdir_evaluation(tmp_path):
  # The evaluation of a trainer workdir records the workdir as its model; its tokenizer is
  # in hf_final/ (the lookup used to try the workdir itself and fail).
  run = tmp_path / "run"
  save_tiny_model(run / "hf_final")
  (run / "config.json").write_text(json.dumps({"data": {"instruction": ""}}))
  recs = [_rec("p0", 0, False, 4, token_ids=[65, 66, 67, 68], token_entropy=[0.1, 0.9, 0.2, 0.8])]
  d = _write(tmp_path / "ev", recs, config={"model": str(run)})
  out = tmp_path / "fig"
  assert analysis_main(["high_entropy_tokens", f"--samples={d}", f"--out={out}"]) == 0
  _, js = _outputs(out, "high_entropy_tokens")
  assert js["num_tokens"] == 4


def test_prompts_use_the_runs_own_instruction(tmp_path):
  from egrc_jax.data import chat
  from egrc_jax.evaluate import model_io

  run = tmp_path / "run"
  save_tiny_model(run / "hf_final")
  (run / "config.json").write_text(json.dumps({"data": {"instruction": "", "system_prompt": "S"}}))
  src = model_io.resolve(run)
  # A trainer run (e.g. the toy, trained without the math instruction) is prompted as trained.
  assert sampling.prompt_format(src, None) == ("", "S")
  assert sampling.prompt_format(src, "Think.") == ("Think.", "S")  # --instruction wins
  plain = model_io.resolve(run / "hf_final")  # a plain HF directory: the standard one
  plain = dataclasses.replace(plain, run_config=None)
  assert sampling.prompt_format(plain, None) == (chat.INSTRUCTION, "")
