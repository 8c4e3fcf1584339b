"""The toy task, its tokenizer and a very short SFT run (tiny model, CPU)."""

import dataclasses
import json
import math
import pathlib
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from egrc_jax.toy import data as data_lib
from egrc_jax.toy import sft as sft_lib
from egrc_jax.toy import task as T
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.checkpoint import load_sft, save_sft
from egrc_jax.toy.evaluate import evaluate, is_correct

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
  return T.make_splits(T.TaskConfig(), 2000, 500, seed=0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("toy_tok")
  tok_lib.build_tokenizer(d)
  return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
  return AutoTokenizer.from_pretrained(str(tok_dir))


def test_splits_deterministic_and_disjoint(splits):
  train, test = splits
  again = T.make_splits(T.TaskConfig(), 2000, 500, seed=0)
  assert [p.text for p in train] == [p.text for p in again[0]]
  assert [p.text for p in test] == [p.text for p in again[1]]
  other = T.make_splits(T.TaskConfig(), 2000, 500, seed=1)
  assert [p.text for p in train] != [p.text for p in other[0]]
  assert len(test) == 500 and len({p.text for p in test}) == 500
  assert not {p.text for p in train} & {p.text for p in test}
  # The split is a property of the problem, so another seed never moves a problem across.
  assert not {p.text for p in other[0]} & {p.text for p in test}


def test_values_stay_in_range(splits):
  cfg = T.TaskConfig()
  for p in splits[0][:500]:
    assert cfg.min_ops <= len(p.ops) <= cfg.max_ops
    assert all(0 <= v <= cfg.value_max for v in p.values)


@pytest.mark.parametrize("style", T.CHECK_STYLES)
def test_verbose_cot_boxes_the_true_answer_when_slips_are_fixed(splits, style):
  cfg = T.CotConfig(check_style=style, slip_prob=0.5, fix_prob=1.0, recheck_prob=0.7)
  rng = np.random.default_rng(0)
  for p in splits[0][:300]:
    text, boxed = T.verbose_cot(p, rng, cfg)
    assert boxed == p.answer
    assert is_correct(text, p.answer)
    assert text.endswith(f"</think> \\boxed{{{p.answer}}}")
  for p in splits[0][:50]:
    assert is_correct(T.concise_cot(p), p.answer)


@pytest.mark.parametrize("style", T.CHECK_STYLES)
def test_unfixed_slips_give_wrong_answers(splits, style):
  rng = np.random.default_rng(0)
  cfg = T.CotConfig(check_style=style, slip_prob=1.0, slip_prob_2d=1.0, fix_prob=0.0)
  problems = splits[0][:100]
  results = [T.verbose_cot(p, rng, cfg) for p in problems]
  # Every step slips and none is fixed; the boxed answer is right only when the slips cancel
  # (e.g. +1 then -1 through two additions), which is rare.
  wrong = sum(boxed != p.answer for (_, boxed), p in zip(results, problems, strict=True))
  assert wrong >= 80, wrong
  assert all(is_correct(text, boxed) for text, boxed in results)


@pytest.mark.parametrize("style", T.CHECK_STYLES)
def test_verbose_part_is_removable(splits, style):
  bare = T.CotConfig(check_style=style, recheck_prob=0, slip_prob=0, slip_prob_2d=0,
                     preamble_prob=0, conclusion_prob=0)  # fmt: skip
  rng = np.random.default_rng(0)
  for p in splits[0][:50]:
    assert T.verbose_cot(p, rng, bare)[0] == T.concise_cot(p)


@pytest.mark.parametrize("style", T.CHECK_STYLES)
def test_recheck_count_respects_cap(splits, style):
  cfg = T.CotConfig(check_style=style, recheck_prob=1.0, max_rechecks=3, slip_prob=0.0,
                    slip_prob_2d=0.0)  # fmt: skip
  rng = np.random.default_rng(0)
  text, _ = T.verbose_cot(splits[0][0], rng, cfg)
  steps = len(splits[0][0].ops)
  # Every step and every re-check ends with " ."; the preamble/conclusion add at most 2.
  assert steps + 3 <= text.count(" .") <= steps + 3 + 2


def test_careful_check_recomputes_from_one_digit_facts():
  rng = np.random.default_rng(0)

  def body(*step):  # the check after its varied opener
    return T.careful_check(rng, *step).split(" : ", 1)[1]

  assert body(18, "add", 5, 23, 22) == "8 + 5 = 13 , so 18 + 5 = 23 , not 22 ."
  assert body(23, "minus", 4, 19) == "13 - 4 = 9 , so 23 - 4 = 19 ."
  assert body(27, "minus", 4, 23) == "7 - 4 = 3 , so 27 - 4 = 23 ."
  assert body(13, "times", 3, 39) == "10 * 3 = 30 , 3 * 3 = 9 , so 13 * 3 = 39 ."
  assert body(7, "add", 5, 12) == "7 + 5 = 12 ."
  openers = {T.careful_check(rng, 7, "add", 5, 12).split(" : ")[0] for _ in range(400)}
  assert len(openers) == 5 * 3 * 5  # connector x verb x object, all drawn


def test_careful_checks_are_true_and_catch_every_slip(splits):
  """Every equation a careful solution writes is true except a slipped first computation, and
  each slip is followed by a check that ends in the right value and rejects the slip."""
  cfg = T.CotConfig(check_style="careful", slip_prob=0.3, slip_prob_2d=0.5)
  rng = np.random.default_rng(1)
  slips = 0
  for p in splits[0][:300]:
    text, _ = T.verbose_cot(p, rng, cfg)
    sentences = text.split(" . ")
    for i, sentence in enumerate(sentences):
      eqs = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", sentence)
      if not eqs:
        continue
      truth = [int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[o]
               for a, o, b, c in eqs]  # fmt: skip
      if " : " in sentence:  # a re-check: every equation in it is true
        assert all(truth), sentence
      elif not truth[0]:  # a slipped step: the next sentence is the check that fixes it
        slips += 1
        nxt = sentences[i + 1]
        assert " : " in nxt and nxt.endswith(f", not {eqs[0][3]}"), (sentence, nxt)
        a, o, b, c = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", nxt)[-1]
        assert (a, o, b) == eqs[0][:3] and c != eqs[0][3]
  assert slips > 50


def test_toy_config_sections_reach_the_plan():
  # Every toy setting is a key of configs/toy.py; its sections build the typed plan.
  from egrc_jax.toy.plan import toy_plan
  from egrc_jax.trainer.config import load_config_spec

  plan = toy_plan(load_config_spec(
    f"{ROOT}/configs/toy.py:cot.check_style=restate,cot.recheck_prob=0.3,sft.steps=900,"
    "task.max_ops=4,eval.max_new_tokens=100,pipeline.seeds=0+1+2"
  ))  # fmt: skip
  assert plan.cot == T.CotConfig(check_style="restate", recheck_prob=0.3)
  assert plan.sft.steps == 900 and plan.task.max_ops == 4 and plan.seeds == (0, 1, 2)
  assert plan.eval_max_new_tokens == 100 and plan.num_test == 500
  quick = toy_plan(load_config_spec(f"{ROOT}/configs/toy.py:quick,cot.max_rechecks=2"))
  assert quick.cot.recheck_prob == 0.3 and quick.cot.max_rechecks == 2  # preset, then keys
  assert quick.num_test == 50 and quick.config.compress.steps == 2
  with pytest.raises(ValueError, match="config section 'cot': .*recheck_prob=1.5"):
    toy_plan(load_config_spec(f"{ROOT}/configs/toy.py:cot.recheck_prob=1.5"))
  with pytest.raises(KeyError, match="unknown config key 'cot.recheck'"):
    load_config_spec(f"{ROOT}/configs/toy.py:cot.recheck=0.5")
  with pytest.raises(ValueError, match="config preset 'quik' is unknown"):
    load_config_spec(f"{ROOT}/configs/toy.py:quik")


def test_config_validation():
  with pytest.raises(ValueError, match="slip_prob"):
    T.CotConfig(slip_prob=1.5)
  with pytest.raises(ValueError, match="check_style"):
    T.CotConfig(check_style="loud")
  with pytest.raises(ValueError, match="min_ops"):
    T.TaskConfig(min_ops=4, max_ops=3)


def test_tokenizer_round_trip_and_auto_load(splits, tokenizer):
  assert len(tokenizer) < 128
  assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
  rng = np.random.default_rng(0)
  for p in splits[1][:200]:
    for text in (T.verbose_cot(p, rng, T.CotConfig(slip_prob=0.5))[0], T.concise_cot(p), p.text):
      ids = tokenizer.encode(text, add_special_tokens=False)
      assert tokenizer.unk_token_id not in ids
      assert tokenizer.decode(ids) == text
  # Digits are single tokens; connectors are whole-word tokens.
  assert tokenizer.convert_ids_to_tokens(
    tokenizer.encode("wait , 12", add_special_tokens=False)
  ) == ["wait", ",", "1", "##2"]
  prompt = tok_lib.encode_prompt(tokenizer, splits[1][0].text)
  assert prompt[0] == tokenizer.bos_token_id
  assert tokenizer.convert_ids_to_tokens(prompt[-2:]) == ["<assistant>", "<think>"]
  response = tok_lib.encode_response(tokenizer, T.concise_cot(splits[1][0]))
  full = tokenizer.decode(prompt + response, skip_special_tokens=True)
  assert "</think>" in full and is_correct(full, splits[1][0].answer)


def test_is_correct():
  assert is_correct("</think> \\boxed{12}", 12)
  assert is_correct("\\boxed{3} </think> \\boxed{-4}", -4)
  assert not is_correct("</think> \\boxed{12}", 13)
  assert not is_correct("</think> no box", 1)
  assert not is_correct("</think> \\boxed{1+1}", 2)  # never evaluated
  # Cut off in its reasoning (the prompt opened <think>): a box there is no final answer,
  # as the trainer grades it.
  assert not is_correct("7 + 5 = 12 . \\boxed{12}", 12)


def test_data_cli_writes_jsonl(tmp_path):
  data_lib.main(["--out", str(tmp_path), "--config",
                 f"{ROOT}/configs/toy.py:sft.num_train=50,eval.num_prompts=20"])  # fmt: skip
  rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
  assert len(rows) == 20 and set(rows[0]) == {"id", "problem", "answer"}
  _, test = T.make_splits(T.TaskConfig(), 50, 20, seed=0)
  assert [r["answer"] for r in rows] == [str(p.answer) for p in test]


TINY = sft_lib.SftConfig(
  hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
  head_dim=16, num_train=64, steps=8, batch_size=8, learning_rate=1e-2, log_every=4,
  pad_multiple=256,
)  # fmt: skip
MAX_NEW = 24


def test_sft_config_refuses_bad_values():
  with pytest.raises(ValueError, match="steps=0 and batch_size=8 must be >= 1"):
    dataclasses.replace(TINY, steps=0)
  with pytest.raises(ValueError, match="num_train=4 must be >= batch_size=8"):
    dataclasses.replace(TINY, num_train=4)


@pytest.fixture(scope="module")
def trained(splits, tokenizer):
  train = splits[0][: TINY.num_train]
  logs = []
  model, history = sft_lib.train_sft(TINY, T.CotConfig(), tokenizer, train, 0, log=logs.append)
  return model, history, logs


def test_short_sft_reduces_loss_and_gives_finite_metrics(trained, splits, tokenizer):
  model, history, logs = trained
  losses = [loss for _, loss, _ in history]
  assert all(math.isfinite(x) for x in losses)
  # From ~log(V) at init; 8 steps at lr 1e-2 on a tiny model cut it by far more than noise.
  assert losses[-1] < losses[0] - 0.5, losses
  assert any("tokens/s" in line for line in logs)
  m = evaluate(model, tokenizer, splits[1][:8], temperature=0.6, max_new_tokens=MAX_NEW)
  for k in ("accuracy", "mean_length", "truncated", "connector_share", "concise_length"):
    assert math.isfinite(m[k]), (k, m[k])
  assert 0 <= m["accuracy"] <= 1 and 1 <= m["mean_length"] <= MAX_NEW


def test_save_load_round_trip(trained, tok_dir, tmp_path, splits):
  import jax.numpy as jnp

  from egrc_jax.model import positions_from_mask

  model = trained[0]
  save_sft(model, tok_dir, tmp_path / "sft")
  loaded, tok = load_sft(tmp_path / "sft")
  assert tok.get_vocab() == AutoTokenizer.from_pretrained(str(tok_dir)).get_vocab()
  # Next to a qwen2 config.json, AutoTokenizer would swap in Qwen2's byte-level decoder;
  # the loaded tokenizer must decode model output exactly as the toy tokenizer writes it.
  text = T.concise_cot(splits[1][0])
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  assert loaded.cfg.vocab_size == model.cfg.vocab_size and model.cfg.vocab_size % 8 == 0
  ids = jnp.asarray([tok_lib.encode_prompt(tok, splits[1][0].text)])
  mask = jnp.ones_like(ids, bool)
  pos = positions_from_mask(mask)
  np.testing.assert_array_equal(
    np.asarray(model(ids, pos, mask)), np.asarray(loaded(ids, pos, mask))
  )


def test_sft_batch_masks_only_response_targets(splits, tokenizer):
  examples = T.sft_examples(splits[0][:5], T.CotConfig(), seed=0)
  seqs, prompt_lens = sft_lib.tokenize_examples(tokenizer, examples)
  batch = sft_lib.make_batch(seqs, prompt_lens, [0, 1, 2, 3, 4], tokenizer.pad_token_id, 32)
  assert batch["tokens_BT"].shape[1] % 32 == 0
  for r, (seq, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
    targets = batch["tokens_BT"][r, 1:][batch["loss_BT"][r, :-1] > 0]
    # Exactly the response (reasoning, boxed answer, <eos>) is predicted; no prompt, no pad.
    np.testing.assert_array_equal(targets, seq[p:])
    assert targets[-1] == tokenizer.eos_token_id
    assert batch["mask_BT"][r].sum() == len(seq)


def test_sft_cli_reads_the_toy_config(tmp_path, monkeypatch):
  seen = {}
  train = sft_lib.train_sft

  def spy(cfg, cot, *args, **kwargs):
    seen["cot"] = cot
    return train(cfg, cot, *args, **kwargs)

  monkeypatch.setattr(sft_lib, "train_sft", spy)
  keys = ("sft.steps=2,sft.num_train=64,eval.num_prompts=4,sft.batch_size=8,sft.num_layers=1,"
          "sft.hidden_size=32,sft.intermediate_size=48,cot.check_style=careful,"
          "cot.max_rechecks=2,eval.max_new_tokens=16")  # fmt: skip
  assert sft_lib.main(["--workdir", str(tmp_path), f"--config={ROOT}/configs/toy.py:{keys}"]) == 0
  assert seen["cot"] == T.CotConfig(check_style="careful", max_rechecks=2)
  config = json.loads((tmp_path / "sft" / "config.json").read_text())
  assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
    1, 32, 48,
  )  # fmt: skip
  metrics = json.loads((tmp_path / "sft_metrics.json").read_text())
  assert metrics["steps"] == 2 and metrics["num_problems"] == 4
  assert metrics["mean_length"] <= 16  # the evaluation budget: eval.max_new_tokens
