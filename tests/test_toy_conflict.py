"""The column-arithmetic re-checks of the toy task (cot.check_style=column, a design tried
for the entropy-conflict variant: docs/toy_conflict.md), the `conflict` preset, and the
entropy-conflict diagnostics (egrc_jax/toy/conflict.py), against hand-derived values."""

import pathlib
import re

import numpy as np
import pytest

from egrc_jax import losses
from egrc_jax.toy import conflict
from egrc_jax.toy import task as T

COLUMN_TASK = T.TaskConfig(value_max=99, start_max=30, operand_max=40, times_max=4)


def _body(*step):
  return T.column_check(np.random.default_rng(0), *step).split(" : ", 1)[1]


def test_column_check_bodies():
  assert _body(47, "add", 38, 85) == "7 + 8 = 15 , 4 + 3 + 1 = 8 , so 47 + 38 = 85 ."
  assert _body(62, "minus", 37, 25, 35) == "12 - 7 = 5 , 6 - 3 - 1 = 2 , so 62 - 37 = 25 , not 35 ."
  assert _body(68, "minus", 23, 45) == "8 - 3 = 5 , 6 - 2 = 4 , so 68 - 23 = 45 ."
  assert _body(5, "add", 21, 26) == "5 + 1 = 6 , 0 + 2 = 2 , so 5 + 21 = 26 ."
  assert _body(32, "times", 3, 96) == "30 * 3 = 90 , 2 * 3 = 6 , 90 + 6 = 96 , so 32 * 3 = 96 ."
  assert _body(7, "times", 3, 21) == "7 * 3 = 21 ."  # one-digit: restated
  assert _body(7, "add", 2, 9) == "7 + 2 = 9 ."
  assert T.hard_step(5, "add", 21) and T.hard_step(12, "times", 3)
  assert not T.hard_step(5, "times", 12) and not T.hard_step(9, "minus", 9)


_EQ = re.compile(r"(\d+) ([-+*]) (\d+)(?: ([-+]) (\d+))? = (\d+)")


def _true(m) -> bool:
  a, o, b, o2, c, r = m
  ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
  v = ops[o](int(a), int(b))
  if o2:
    v = ops[o2](v, int(c))
  return v == int(r)


def test_column_checks_are_true_and_catch_every_slip():
  """Every equation a column solution writes is true except a slipped first computation; each
  slip is on a hard step and is followed by the check that rejects it."""
  train, _ = T.make_splits(COLUMN_TASK, 300, 10, seed=0)
  cfg = T.CotConfig(check_style="column", slip_prob=0.0, slip_prob_2d=0.5)
  rng = np.random.default_rng(1)
  slips = 0
  for p in train:
    text, boxed = T.verbose_cot(p, rng, cfg)
    assert boxed == p.answer
    sentences = text.split(" . ")
    for i, sentence in enumerate(sentences):
      eqs = _EQ.findall(sentence)
      if not eqs:
        continue
      truth = [_true(m) for m in eqs]
      if " : " in sentence:
        assert all(truth), sentence
      elif not truth[0]:
        slips += 1
        a, o, b = (
          int(eqs[0][0]),
          {"+": "add", "-": "minus", "*": "times"}[eqs[0][1]],
          int(eqs[0][2]),
        )
        assert T.hard_step(a, o, b), sentence  # slip_prob = 0: only hard steps slip
        nxt = sentences[i + 1]
        assert " : " in nxt and nxt.endswith(f", not {eqs[0][5]}"), (sentence, nxt)
  assert slips > 100


def test_column_task_has_two_digit_operands():
  train, _ = T.make_splits(COLUMN_TASK, 500, 10, seed=0)
  steps = [
    (v, op, b) for p in train for v, (op, b) in zip([p.start, *p.values[:-1]], p.ops, strict=True)
  ]
  assert all(0 <= v <= 99 for p in train for v in p.values)
  two_digit = [b >= 10 for _, op, b in steps if op != "times"]
  assert np.mean(two_digit) > 0.5
  assert np.mean([T.hard_step(*s) for s in steps]) > 0.6


def test_conflict_preset_starts_most_chains_from_two_digit_values():
  from egrc_jax.toy.plan import toy_plan
  from egrc_jax.trainer.config import load_config_spec

  plan = toy_plan(
    load_config_spec(str(pathlib.Path(__file__).parents[1] / "configs" / "toy.py") + ":conflict")
  )
  assert plan.task == T.TaskConfig(start_max=30) and plan.cot == T.CotConfig()
  assert plan.pipeline.arms == ("egrc", "ee", "ee_star", "reverse")
  assert plan.pipeline.conflict_prompts == 100 and plan.config.rollout.max_new_tokens == 320
  train, _ = T.make_splits(plan.task, 1000, 10, seed=0)
  steps = [v for p in train for v in [p.start, *p.values[:-1]]]
  assert 0.7 < np.mean([v >= 10 for v in steps]) < 0.8  # the default task: ~0.23


def test_token_statistics_match_the_learner():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)) * 2
  tokens = rng.integers(0, 11, size=(3, 5))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ours = conflict.token_statistics(p, tokens)
  ref = losses.token_stats_from_logits(logits, tokens, 1.0)
  np.testing.assert_allclose(ours["entropy_BC"], np.asarray(ref.entropy_BC), rtol=1e-5)
  # ||e_a - p||^2 = 1 - 2 p_a + sum p^2 (losses.logit_grad_norm's formula)
  direct = np.linalg.norm(np.eye(11)[tokens] - p, axis=-1)
  np.testing.assert_allclose(ours["dist_BC"], direct, rtol=1e-9)


def test_connector_gradient_hand_values():
  # Two rows of two tokens, vocabulary 4, connectors {1, 2}.
  p = np.array([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
                [[0.5, 0.0, 0.5, 0.0], [0.7, 0.1, 0.1, 0.1]]])  # fmt: skip
  tokens = np.array([[1, 3], [0, 2]])
  mask = np.array([[True, True], [True, False]])
  adv = np.array([2.0, -1.0])
  # s = A * (1[a in conn] - p(conn)):  row 0: 2 * (1 - 0.5) = 1, 2 * (0 - 0.5) = -1;
  # row 1: -1 * (0 - 0.5) = 0.5; the masked token does not count. mean = 0.5 / 3.
  out = conflict.connector_gradient(adv, p, tokens, mask, [1, 2])
  assert out["connector_grad_mean"] == pytest.approx(0.5 / 3)
  # mean |A| over the valid tokens: (2 + 2 + 1) / 3
  assert out["connector_grad_per_abs_adv"] == pytest.approx((0.5 / 3) / (5 / 3))


def test_within_group_hand_values():
  lengths = [[10, 20, 30, 40], [5, 5, 9, 7], [3, 4, 5, 6]]
  correct = [[0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]]
  out = conflict.within_group(lengths, correct)
  assert out["groups_varying"] == 2  # the all-correct group carries no information
  # centred: group 0 L = -15,-5,5,15, c = -.5,-.5,.5,.5; group 2 L = -1.5,-.5,.5,1.5,
  # c = .5,-.5,.5,-.5: sum Lc = 20 + (-1) = 19; sum L^2 = 500 + 5; sum c^2 = 1 + 1
  assert out["length_correct_r"] == pytest.approx(19 / np.sqrt(505 * 2))
  # shorter halves: [0, 0], [1, 1], [1, 0]; longer: [1, 1], [1, 1], [1, 0]
  assert out["accuracy_shorter_half"] == pytest.approx(3 / 6)
  assert out["accuracy_longer_half"] == pytest.approx(5 / 6)


def test_selected_samples_weighting():
  w = np.array([0.0, 0.5, 1.5])
  out = conflict.selected(
    w, np.array([100, 20, 40]), np.array([1.0, 0.2, 0.6]), np.array([3, 0, 1])
  )
  assert out["selected"] == 2
  assert out["mean_tokens"] == pytest.approx((0.5 * 20 + 1.5 * 40) / 2)
  assert out["mean_entropy"] == pytest.approx((0.5 * 0.2 + 1.5 * 0.6) / 2)
  assert out["mean_rechecks"] == pytest.approx(1.5 / 2)
