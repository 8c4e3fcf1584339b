"""Rewards: every function against hand-computed values, edge cases, group permutation.

Tolerances: expected values are written as decimal arithmetic; functions compute in float64
(compute_rewards returns float32), so 1e-12 (float64) / 1e-6 (float32) cover rounding only.
"""

import math

import numpy as np
import pytest

from egrc_jax import rewards as R
from egrc_jax.rewards import RewardConfig, compute_rewards

F64 = dict(rtol=0, atol=1e-12)
F32 = dict(rtol=0, atol=1e-6)

# One shared batch: P=2 groups, G=4 samples. L = 100.
CORRECT = np.array([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=bool)
LENGTHS = np.array([[20, 50, 80, 100], [10, 10, 10, 100]])
TRUNC = np.array([[0, 0, 0, 1], [0, 0, 0, 1]], dtype=bool)


def test_correctness_and_clip():
  c = R.correctness(CORRECT)
  np.testing.assert_array_equal(c, [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
  # The truncated (last) sample of group 0 was graded correct; clipping zeroes it.
  np.testing.assert_array_equal(R.clip_truncated(c, TRUNC), [[1, 0, 1, 0], [0, 0, 0, 0]])


def test_exp_shaping_values():
  # r = 0.5, L = 100: lambda = ln2/100; f(0)=1, f(50)=2^-0.5=0.70710678..., f(100)=0.5,
  # f(200)=0.25.
  f = R.exp_shaping(np.array([0, 50, 100, 200]), 0.5, 100)
  np.testing.assert_allclose(f, [1.0, 1 / math.sqrt(2), 0.5, 0.25], **F64)
  # r = 0.1, L = 10: f(5) = 0.1^(5/10) = sqrt(0.1) = 0.316227766...
  np.testing.assert_allclose(R.exp_shaping(5, 0.1, 10), math.sqrt(0.1), **F64)


def test_linear_shaping_values():
  # f(x) = 1 - (1 - 0.5) x / 100: f(0)=1, f(50)=0.75, f(100)=0.5.
  f = R.linear_shaping(np.array([0, 50, 100]), 0.5, 100)
  np.testing.assert_allclose(f, [1.0, 0.75, 0.5], **F64)


@pytest.mark.parametrize("fn", [R.exp_shaping, R.linear_shaping])
def test_shaping_r_bounds(fn):
  # Near the bounds f(0)=1 and f(L)=r still hold.
  for r in (1e-12, 1 - 1e-12):
    f = fn(np.array([0.0, 100.0]), r, 100)
    np.testing.assert_allclose(f, [1.0, r], rtol=1e-9, atol=0)
  for bad_r in (0.0, 1.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="r must lie strictly inside"):
      fn(np.array([1.0]), bad_r, 100)
  for bad_l in (0, -5):
    with pytest.raises(ValueError, match="L must be > 0"):
      fn(np.array([1.0]), 0.5, bad_l)


def test_compress_reward():
  # R = c * 0.5^(|y|/100), 0 when truncated:
  # group 0: [0.5^0.2, 0, 0.5^0.8, 0 (truncated)] ; group 1 all wrong -> 0.
  got = R.compress_reward(CORRECT, LENGTHS, TRUNC, 0.5, 100)
  want = [[0.5**0.2, 0.0, 0.5**0.8, 0.0], [0.0, 0.0, 0.0, 0.0]]
  np.testing.assert_allclose(got, want, **F64)


def test_enhance_components_and_ee():
  acc, ln = R.enhance_components(CORRECT, LENGTHS, TRUNC, 0.5, 100)
  np.testing.assert_allclose(acc, [[1, 0, 1, 0], [0, 0, 0, 0]], **F64)
  np.testing.assert_allclose(ln, [[0.5**0.2, 0, 0.5**0.8, 0], [0, 0, 0, 0]], **F64)
  # EE: c + w c f with w = 0.5: 1 + 0.5 * 0.5^0.2 = 1.43527...; 1 + 0.5 * 0.5^0.8.
  ee = R.ee_reward(CORRECT, LENGTHS, TRUNC, 0.5, 100, w=0.5)
  want = [[1 + 0.5 * 0.5**0.2, 0, 1 + 0.5 * 0.5**0.8, 0], [0, 0, 0, 0]]
  np.testing.assert_allclose(ee, want, **F64)


def test_zero_length_response():
  # f(0) = 1, so a correct empty response gets the full reward 1 under every EGRC arm.
  got = R.compress_reward(np.array([[True]]), np.array([[0]]), np.array([[False]]), 0.3, 50)
  np.testing.assert_allclose(got, [[1.0]], **F64)


def test_l1():
  c = np.array([[1.0, 0.0, 1.0]])
  n = np.array([[1000, 1000, 5000]])
  # Exact, n_target 2000, alpha 3e-4: 1 - 0.0003*1000 = 0.7; 0 - 0.3 = -0.3; 1 - 0.0003*3000 = 0.1.
  np.testing.assert_allclose(R.l1_exact(c, n, 2000, 0.0003), [[0.7, -0.3, 0.1]], **F64)
  # Max: clip(0.0003*(2000-1000)+0.5) = clip(0.8) = 0.8; wrong -> 0;
  # clip(0.0003*(2000-5000)+0.5) = clip(-0.4) = 0. Shorter than target saturates at 1:
  # clip(0.0003*(2000-0)+0.5) = clip(1.1) = 1.
  np.testing.assert_allclose(R.l1_max(c, n, 2000, 0.0003), [[0.8, 0.0, 0.0]], **F64)
  np.testing.assert_allclose(R.l1_max([[1.0]], [[0]], 2000, 0.0003), [[1.0]], **F64)


def test_kimi():
  c = np.array([[1.0, 1.0, 0.0, 0.0]])
  n = np.array([[100, 300, 200, 500]])
  # min 100, max 500, span 400: lambda = 0.5 - (n-100)/400 = [0.5, 0.0, 0.25, -0.5].
  np.testing.assert_allclose(R.kimi_lambda(n), [[0.5, 0.0, 0.25, -0.5]], **F64)
  # correct: c + lambda = [1.5, 1.0]; wrong: min(0, lambda) = [0, -0.5].
  np.testing.assert_allclose(R.kimi(c, n), [[1.5, 1.0, 0.0, -0.5]], **F64)
  # All-equal lengths: lambda = 0, reward = c.
  np.testing.assert_allclose(R.kimi(c, np.full((1, 4), 7)), c, **F64)


def test_arora_zanette():
  c = np.array([[1.0, 1.0, 0.0, 1.0]])
  n = np.array([[100, 300, 50, 200]])
  # Correct lengths {100, 300, 200}: mean 200, population std sqrt(20000/3) = 81.6497.
  # z = [-1.2247449, 1.2247449, -, 0]; sigmoid(+-1.2247449) = 0.7729 / 0.2271, sigmoid(0) = 0.5.
  std = math.sqrt(20000 / 3)
  sig = lambda z: 1 / (1 + math.exp(-z))
  want = [[1 - 0.1 * sig(-100 / std), 1 - 0.1 * sig(100 / std), 0.0, 1 - 0.1 * 0.5]]
  np.testing.assert_allclose(R.arora_zanette(c, n, alpha=0.1), want, **F64)
  # One correct response (std 0): z = 0, reward 1 - alpha/2 = 0.95; all wrong: 0.
  np.testing.assert_allclose(
    R.arora_zanette([[1.0, 0.0], [0.0, 0.0]], [[10, 20], [5, 6]], 0.1), [[0.95, 0], [0, 0]], **F64
  )


def test_shorter_better():
  c = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
  n = np.array([[100, 300, 500], [100, 200, 600]])
  # Group 0: SOL = 300 (shortest correct): 2c - 0.001|n - 300| = [-0.2, 2.0, 1.8].
  # Group 1: no correct -> SOL = mean = 300: [-0.2, -0.1, -0.3].
  np.testing.assert_allclose(R.shortest_correct_length(c, n), [[300], [300]], **F64)
  want = [[-0.2, 2.0, 1.8], [-0.2, -0.1, -0.3]]
  np.testing.assert_allclose(R.shorter_better(c, n), want, **F64)


def test_dapo_overlong():
  n = np.array([[0, 60, 80, 90, 100, 120]])
  # L = 100, B = 20: 0 up to 80, (80 - n)/20 after: 90 -> -0.5, 100 -> -1, beyond -> -1.
  np.testing.assert_allclose(R.dapo_overlong_penalty(n, 100, 20), [[0, 0, 0, -0.5, -1, -1]], **F64)
  c = np.array([[1, 1, 1, 1, 0, 0]])
  # DAPO's rule reward is +1 / -1: R = (2c - 1) + penalty = [1, 1, 1, 0.5, -2, -2].
  np.testing.assert_allclose(R.dapo_overlong(c, n, 100, 20), [[1, 1, 1, 0.5, -2, -2]], **F64)
  # The {0, 1} form on request: c + penalty.
  np.testing.assert_allclose(
    R.dapo_overlong(c, n, 100, 20, signed=False), [[1, 1, 1, 0.5, -1, -1]], **F64
  )


def test_dapo_penalty_relative_weight_after_group_normalisation():
  # One correct response of length 90 (penalty -0.5) and one wrong of length 10 (penalty 0),
  # L = 100, B = 20. Signed: R = [0.5, -1]; the {0, 1} form: R = [0.5, 0]. Normalised in
  # the group, A = +-1 either way, but the penalty's share of the reward gap differs:
  # signed gap 1.5 of which 0.5 is the penalty (1/3); binary gap 0.5, all of it the penalty.
  c, n = np.array([[1.0, 0.0]]), np.array([[90, 10]])
  signed = R.dapo_overlong(c, n, 100, 20)
  binary = R.dapo_overlong(c, n, 100, 20, signed=False)
  np.testing.assert_allclose(signed, [[0.5, -1.0]], **F64)
  np.testing.assert_allclose(binary, [[0.5, 0.0]], **F64)
  cfg = _cfg("dapo_overlong", buffer=20)
  out = compute_rewards(cfg, c.astype(bool), n, np.zeros((1, 2), bool))
  np.testing.assert_allclose(out.total_PG, signed, **F32)


def test_equal_baseline_group_statistics_are_exactly_neutral():
  # Equal lengths give no group length signal: Kimi's lambda and A&Z's z are exactly 0.
  for value in (8192, 7, 1234.5):
    n = np.full((1, 8), value)
    assert np.all(R.kimi_lambda(n) == 0.0)
    c = np.ones((1, 8))
    assert np.all(R.correct_length_z(c, n) == 0.0)
    np.testing.assert_array_equal(R.arora_zanette(c, n, 0.1), np.full((1, 8), 0.95))
  # Equal correct lengths whose float mean rounds (3 x 0.1 sums to 0.30000000000000004, and
  # /3 is not 0.1): the rounded std is ~1e-17, yet z must be exactly 0.
  c, n = np.array([[1, 1, 1, 0]]), np.array([[0.1, 0.1, 0.1, 5.0]])
  np.testing.assert_array_equal(R.correct_length_z(c, n)[0, :3], 0.0)
  with pytest.raises(ValueError, match="buffer"):
    R.dapo_overlong_penalty(n, 100, 0)


def _cfg(name, **kw):
  kw.setdefault("max_len", 100)
  return RewardConfig(name=name, **kw)


def test_compute_rewards_components():
  out = compute_rewards(_cfg("egrc_compress"), CORRECT, LENGTHS, TRUNC)
  want_len = [[0.5**0.2, 0, 0.5**0.8, 0], [0, 0, 0, 0]]
  np.testing.assert_allclose(out.total_PG, want_len, **F32)
  np.testing.assert_allclose(out.acc_PG, [[1, 0, 1, 0], [0, 0, 0, 0]], **F32)
  np.testing.assert_allclose(out.len_PG, want_len, **F32)
  assert out.total_PG.dtype == np.float32 and out.total_PG.shape == (2, 4)
  enh = compute_rewards(_cfg("egrc_enhance", w_len=0.5), CORRECT, LENGTHS, TRUNC)
  np.testing.assert_allclose(enh.len_PG, want_len, **F32)
  np.testing.assert_allclose(enh.total_PG, enh.acc_PG + 0.5 * enh.len_PG, **F32)
  lin = compute_rewards(_cfg("linear_compress"), CORRECT, LENGTHS, TRUNC)
  # 1 - 0.5*0.2 = 0.9; 1 - 0.5*0.8 = 0.6.
  np.testing.assert_allclose(lin.total_PG, [[0.9, 0, 0.6, 0], [0, 0, 0, 0]], **F32)
  m = enh.metrics()
  assert m["reward/acc"] == pytest.approx(2 / 8)


def test_compute_rewards_truncation_rule():
  correct = np.array([[True, True]])
  lengths = np.array([[100, 100]])
  trunc = np.array([[True, False]])
  # Clipping on (default): the truncated correct sample is worth 0.
  out = compute_rewards(_cfg("accuracy"), correct, lengths, trunc)
  np.testing.assert_allclose(out.total_PG, [[0, 1]], **F32)
  out = compute_rewards(_cfg("accuracy", clip_truncated=False), correct, lengths, trunc)
  np.testing.assert_allclose(out.total_PG, [[1, 1]], **F32)
  # ThinkPrune always clips at L.
  out = compute_rewards(_cfg("thinkprune", clip_truncated=False), correct, lengths, trunc)
  np.testing.assert_allclose(out.total_PG, [[0, 1]], **F32)
  # DAPO: truncated -> wrong (rule reward -1), penalty -1 at L; correct at L: 1 - 1 = 0.
  out = compute_rewards(_cfg("dapo_overlong", buffer=20), correct, lengths, trunc)
  np.testing.assert_allclose(out.total_PG, [[-2, 0]], **F32)
  np.testing.assert_allclose(out.extra["dapo_penalty"], [[-1, -1]], **F32)


ALL_CONFIGS = [
  _cfg("egrc_compress"),
  _cfg("egrc_enhance"),
  _cfg("ee", w_len=0.3),
  _cfg("linear_compress"),
  _cfg("accuracy"),
  _cfg("thinkprune"),
  _cfg("l1_exact", n_target=40),
  _cfg("l1_max", n_target=40, l1_alpha=0.01),
  _cfg("kimi"),
  _cfg("arora_zanette", az_alpha=0.2),
  _cfg("shorter_better"),
  _cfg("dapo_overlong", buffer=30),
]


def test_every_name_has_a_config():
  assert sorted(c.name for c in ALL_CONFIGS) == sorted(R.REWARD_NAMES)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.name)
def test_group_permutation_permutes_rewards(cfg):
  rng = np.random.default_rng(0)
  correct = rng.random((3, 6)) < 0.5
  lengths = rng.integers(0, 101, size=(3, 6))
  trunc = lengths == 100
  base = compute_rewards(cfg, correct, lengths, trunc)
  perm = rng.permutation(6)
  out = compute_rewards(cfg, correct[:, perm], lengths[:, perm], trunc[:, perm])
  np.testing.assert_allclose(out.total_PG, base.total_PG[:, perm], **F32)
  np.testing.assert_allclose(out.len_PG, base.len_PG[:, perm], **F32)
  for k, v in base.extra.items():
    np.testing.assert_allclose(out.extra[k], v[:, perm], **F32)
  # Groups are independent: swapping the rows swaps the rewards.
  swapped = compute_rewards(cfg, correct[::-1], lengths[::-1], trunc[::-1])
  np.testing.assert_allclose(swapped.total_PG, base.total_PG[::-1], **F32)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.name)
def test_all_wrong_group(cfg):
  # No correct answer: every arm's accuracy and EGRC length parts are 0 and nothing is NaN.
  correct = np.zeros((1, 4), dtype=bool)
  lengths = np.array([[0, 10, 10, 100]])
  out = compute_rewards(cfg, correct, lengths, lengths == 100)
  assert np.all(np.isfinite(out.total_PG))
  np.testing.assert_array_equal(out.acc_PG, 0)
  np.testing.assert_array_equal(out.len_PG, 0)
  if cfg.name not in ("l1_exact", "kimi", "shorter_better", "dapo_overlong"):
    np.testing.assert_array_equal(out.total_PG, 0)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.name)
def test_identical_lengths_group(cfg):
  # Equal lengths: no group-relative length signal, so correct samples share one reward.
  correct = np.array([[True, True, False, True]])
  lengths = np.full((1, 4), 30)
  out = compute_rewards(cfg, correct, lengths, np.zeros((1, 4), bool))
  assert np.all(np.isfinite(out.total_PG))
  ok = out.total_PG[correct]
  np.testing.assert_allclose(ok, ok[0], **F32)


def test_config_validation():
  with pytest.raises(ValueError, match="valid names: egrc_compress"):
    RewardConfig(name="grpo", max_len=100)
  with pytest.raises(ValueError, match="r must lie strictly inside"):
    RewardConfig(name="egrc_compress", max_len=100, r=1.0)
  with pytest.raises(ValueError, match="r must lie strictly inside"):
    RewardConfig(name="egrc_compress", max_len=100, r=0.0)
  with pytest.raises(ValueError, match="L must be > 0"):
    RewardConfig(name="egrc_compress", max_len=0)
  with pytest.raises(ValueError, match="n_target"):
    RewardConfig(name="l1_exact", max_len=100)
  with pytest.raises(ValueError, match="buffer"):
    RewardConfig(name="dapo_overlong", max_len=100, buffer=200)
  with pytest.raises(ValueError, match="shaping"):
    RewardConfig(name="ee", max_len=100, shaping="cubic")
  with pytest.raises(ValueError, match="az_alpha"):
    RewardConfig(name="arora_zanette", max_len=100, az_alpha=1.0)
  with pytest.raises(ValueError, match="w_len"):
    RewardConfig(name="ee", max_len=100, w_len=-1.0)


def test_input_shape_errors():
  cfg = _cfg("egrc_compress")
  with pytest.raises(ValueError, match=r"\[P, G\]"):
    compute_rewards(cfg, np.ones((2, 3), bool), np.ones((2, 4)), np.zeros((2, 3), bool))
  with pytest.raises(ValueError, match=r"\[P, G\]"):
    compute_rewards(cfg, np.ones(3, bool), np.ones(3), np.zeros(3, bool))
  with pytest.raises(ValueError, match="lengths must be >= 0"):
    compute_rewards(cfg, np.ones((1, 2), bool), np.array([[1, -1]]), np.zeros((1, 2), bool))
