"""Tests of egrc_jax.losses: hand-derived values (arithmetic in the comments) and invariances.

Default tolerance: 1e-6 for closed-form float32 arithmetic on O(1) values (a few ulps).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egrc_jax import losses as L

TOL = 1e-6


def close(a, b, tol=TOL):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


# -- advantages -----------------------------------------------------------------------------


def test_group_relative_hand_values():
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
  # group 0: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6); group 1: constant -> 0.
  a = 0.5 / (0.5 + 1e-6)
  close(L.group_relative_advantages(r), [[a, -a, -a, a], [0, 0, 0, 0]])
  # Dr.GRPO (no std): r - mean.
  close(L.group_relative_advantages(r, std_normalize=False), [[0.5, -0.5, -0.5, 0.5], [0] * 4])
  # eps is added to the std: a constant group gives exactly 0, never NaN.
  assert np.all(np.asarray(L.group_relative_advantages(r)[1]) == 0.0)


@pytest.mark.parametrize("value", [-1.2288, 0.7, 1.0, 0.1, -3.3e-3, 123.456])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_equal_reward_groups_get_exactly_zero(value, std_normalize):
  # 8 equal rewards: float32 rounding of the mean used to leave r - mean ~ 1e-7, and dividing
  # by a std of the same order gave -0.1065 (for -1.2288, L1-Exact with all 8 truncated at
  # L = 8192) and +0.056 (for 0.7). The definition says 0 exactly.
  r = jnp.full((2, 8), value, jnp.float32).at[1].set(jnp.arange(8.0))
  for adv in (
    L.group_relative_advantages(r, std_normalize),
    L.decomposed_advantages(r, r, 0.5, std_normalize),
    L.decomposed_advantages(r, jnp.full_like(r, value), 0.5, std_normalize),
    L.entangled_advantages(r, r, 0.5, std_normalize),
  ):
    a = np.asarray(adv)
    assert np.all(a[0] == 0.0), a[0]
    assert np.all(a[1] != 0.0)  # a group with a spread still gets its advantages


def test_absolute_advantages():
  a, pos = L.absolute_advantages(jnp.array([[0.5, 0.0, 0.25]]), beta=2.0)
  close(a, [[1.0, 0.0, 0.5]])  # A = beta * R
  assert pos.tolist() == [[True, False, True]]  # R > 0


def test_decomposed_and_entangled_hand_values():
  acc = jnp.array([[1.0, 1.0, 0.0, 0.0]])
  ln = jnp.array([[0.8, 0.4, 0.0, 0.0]])
  # No std: acc - 0.5 = [.5, .5, -.5, -.5]; len - 0.3 = [.5, .1, -.3, -.3];
  # A = acc_c + 0.5 * len_c = [.75, .55, -.65, -.65].
  close(L.decomposed_advantages(acc, ln, 0.5, std_normalize=False), [[0.75, 0.55, -0.65, -0.65]])
  # Entangled R = acc + 0.5 len = [1.4, 1.2, 0, 0], mean .65 -> centred [.75, .55, -.65, -.65];
  # population var = (.5625 + .3025 + .4225 + .4225) / 4 = .4275, std = .6538348.
  s = math.sqrt(0.4275) + 1e-6
  close(L.entangled_advantages(acc, ln, 0.5), [[0.75 / s, 0.55 / s, -0.65 / s, -0.65 / s]])
  # With std the decomposed form normalises each part alone: acc std .5, len std sqrt(.11).
  # len population var = (.25 + .01 + .09 + .09) / 4 = .11.
  sa, sl = 0.5 + 1e-6, math.sqrt(0.11) + 1e-6
  want = [a / sa + 0.5 * d / sl for a, d in ((0.5, 0.5), (0.5, 0.1), (-0.5, -0.3), (-0.5, -0.3))]
  close(L.decomposed_advantages(acc, ln, 0.5), [want])


@pytest.mark.parametrize("std_normalize", [True, False])
def test_permuting_a_group_permutes_advantages(std_normalize):
  k1, k2 = jax.random.split(jax.random.key(0))
  acc = jax.random.bernoulli(k1, 0.5, (3, 6)).astype(jnp.float32)
  ln = jax.random.uniform(k2, (3, 6)) * acc
  perm = np.array([4, 0, 5, 2, 1, 3])
  for fn in (
    lambda a, b: L.group_relative_advantages(a + b, std_normalize),
    lambda a, b: L.decomposed_advantages(a, b, 0.5, std_normalize),
  ):
    close(fn(acc[:, perm], ln[:, perm]), fn(acc, ln)[:, perm])


def test_rows_groups_roundtrip():
  x = jnp.arange(6.0).reshape(2, 3)
  assert L.rows_from_groups(x).tolist() == [0, 1, 2, 3, 4, 5]  # prompt-major: row p*G + g
  close(L.groups_from_rows(L.rows_from_groups(x), 3), x)
  with pytest.raises(ValueError, match="group_size=4"):
    L.groups_from_rows(jnp.zeros(6), 4)


# -- token log-probs and entropy ------------------------------------------------------------


def test_from_logits_hand_values():
  # logits [0, ln 3] -> p = [1/4, 3/4]; target 1: log .75; H = -(.25 ln .25 + .75 ln .75)
  # = .5623351; sum p^2 = .0625 + .5625 = .625. Same distribution from [0, 2 ln 3] at T = 2.
  for logits, temp in (([0.0, math.log(3)], 1.0), ([0.0, 2 * math.log(3)], 2.0)):
    s = L.token_stats_from_logits(jnp.array([[logits]]), jnp.array([[1]]), temp)
    close(s.logp_BC, [[math.log(0.75)]])
    close(s.entropy_BC, [[0.5623351446]])
    close(s.sum_p2_BC, [[0.625]])
  # Uniform over 4: H = ln 4, log p = -ln 4.
  lp, h = L.logprobs_and_entropy_from_logits(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
  close(lp, [[-math.log(4)]])
  close(h, [[math.log(4)]])


@pytest.fixture(scope="module")
def head():
  k = jax.random.split(jax.random.key(1), 3)
  h = jax.random.normal(k[0], (2, 5, 8))
  w = 0.8 * jax.random.normal(k[1], (8, 37))
  t = jax.random.randint(k[2], (2, 5), 0, 37)
  return h, w, t


def _combo(stats):
  # A generic linear functional of all three outputs, so every cotangent path is exercised.
  return jnp.sum(1.3 * stats[0] + 0.7 * stats[1] - 2.0 * stats[2])


# Chunked vs unchunked: 1e-5 because the online log-sum-exp adds the V terms in another
# order with rescalings exp(m - m'), and H = lse - E[z] cancels two O(|z|) ~ 10 terms;
# float32 rounding of that is a few 1e-6 (measured max 8e-6 on the gradients here).
CHUNK_TOL = 1e-5


@pytest.mark.parametrize("chunk", [8, 64])  # 37 = 4*8 + 5: the last chunk overlaps; 64 > V
def test_chunked_equals_unchunked(head, chunk):
  h, w, t = head

  @jax.jit
  def both(h, w):
    chunked = lambda h, w: L.token_stats(h, w, t, 0.7, chunk)
    full = lambda h, w: L.token_stats_from_logits(h @ w, t, 0.7)
    grads = [jax.grad(lambda h, w, f=f: _combo(f(h, w)), (0, 1))(h, w) for f in (chunked, full)]
    return chunked(h, w), full(h, w), grads, L.token_logprobs_and_entropy(h, w, t, 0.7, chunk)

  got, want, (g_got, g_want), (lp, ent) = both(h, w)
  for a, b in zip(got, want, strict=True):
    close(a, b, CHUNK_TOL)
  for a, b in zip(g_got, g_want, strict=True):
    close(a, b, CHUNK_TOL)
  close(lp, want.logp_BC, CHUNK_TOL)
  close(ent, want.entropy_BC, CHUNK_TOL)


def test_chunked_bf16_dtypes_and_shape_errors(head):
  h, w, t = head
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  gh, gw = jax.grad(lambda h, w: _combo(L.token_stats(h, w, t, 1.0, 16)), (0, 1))(hb, wb)
  assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  s = L.token_stats(hb, wb, t, 1.0, 16)
  assert s.logp_BC.dtype == jnp.float32
  # bf16 inputs, float32 accumulation: within bf16 input rounding (2^-8 relative) of float32.
  ref = L.token_stats_from_logits(hb.astype(jnp.float32) @ wb.astype(jnp.float32), t)
  close(s.logp_BC, ref.logp_BC, 1e-4)
  with pytest.raises(ValueError, match="first axis must be D=8"):
    L.token_stats(h, w.T, t)
  with pytest.raises(ValueError, match="chunk_size=0"):
    L.token_stats(h, w, t, chunk_size=0)


# -- PPO-clip, KL ---------------------------------------------------------------------------

# Ratios r and advantages of the hand case (eps_low .2, eps_high .28, dual c = 3):
#   r=1.5 A=+1: high-clipped, l = -1.28        r=0.5 A=+1: l = -0.5 (no clip for A > 0, r < 1)
#   r=0.5 A=-1: low-clipped,  l = max(.5, .8) = .8    r=1.5 A=-1: l = 1.5
#   r=4   A=-1: l = min(4, c=3) = 3, dual-clipped     r=2 A=-1: l = 2 (< c)
RATIOS = [1.5, 0.5, 0.5, 1.5, 4.0, 2.0]
ADVS = [1.0, 1.0, -1.0, -1.0, -1.0, -1.0]


def _ppo_case(dual):
  logp = jnp.log(jnp.array([RATIOS]))
  return L.ppo_clip_objective(logp, jnp.zeros_like(logp), jnp.array([ADVS]), 0.2, 0.28, dual)


def test_ppo_clip_hand_values_and_indicators():
  loss, clip = _ppo_case(3.0)
  close(loss, [[-1.28, -0.5, 0.8, 1.5, 3.0, 2.0]])
  assert clip.high_BC.tolist() == [[True, False, False, False, False, False]]
  assert clip.low_BC.tolist() == [[False, False, True, False, False, False]]
  assert clip.dual_BC.tolist() == [[False, False, False, False, True, False]]
  loss_nodual, clip_nodual = _ppo_case(None)
  close(loss_nodual, [[-1.28, -0.5, 0.8, 1.5, 4.0, 2.0]])  # r=4, A=-1: unbounded, l = 4
  assert not clip_nodual.dual_BC.any()
  with pytest.raises(ValueError, match="dual_clip_c=0.5"):
    L.ppo_clip_objective(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), 0.2, 0.2, 0.5)


def test_ppo_gradient_zero_exactly_where_clipped():
  logp = jnp.log(jnp.array([RATIOS]))
  adv = jnp.array([ADVS])
  g = jax.grad(
    lambda lp: jnp.sum(L.ppo_clip_objective(lp, jnp.zeros_like(lp), adv, 0.2, 0.28, 3.0)[0])
  )(logp)
  # dl/dlogp = -A r where unclipped: [0, -.5, 0, 1.5, 0, 2].
  close(g, [[0.0, -0.5, 0.0, 1.5, 0.0, 2.0]])


def test_clip_fractions_hand_case():
  _, clip = _ppo_case(3.0)
  mask = jnp.array([[True, True, True, True, True, False]])  # 5 valid tokens
  fr = L.clip_fractions(clip, mask)
  # high: token 0 -> 1/5; low: token 2 -> 1/5; dual: token 4 -> 1/5; any: 3/5.
  close(fr["clip_frac_high"], 0.2)
  close(fr["clip_frac_low"], 0.2)
  close(fr["clip_frac_dual"], 0.2)
  close(fr["clip_frac"], 0.6)


def test_kl_estimators_hand_values_and_k3_nonnegative():
  lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
  close(L.kl_k1(lp, ref), [math.log(2)])  # ln .5 - ln .25 = ln 2
  close(L.kl_k2(lp, ref), [0.5 * math.log(2) ** 2])  # .2402265
  close(L.kl_k3(lp, ref), [0.5 + math.log(2) - 1])  # d = -ln 2: e^d - d - 1 = .1931472
  for kind, fn in (("k1", L.kl_k1), ("k2", L.kl_k2), ("k3", L.kl_k3)):
    close(L.kl_penalty(kind, lp, ref), fn(lp, ref))
  k = jax.random.split(jax.random.key(2))
  a, b = 3 * jax.random.normal(k[0], (1000,)), 3 * jax.random.normal(k[1], (1000,))
  assert float(jnp.min(L.kl_k3(a, b))) >= 0.0
  assert float(jnp.min(L.kl_k2(a, b))) >= 0.0
  with pytest.raises(ValueError, match="'k4'"):
    L.kl_penalty("k4", lp, ref)


def test_approx_kl_hand_value():
  # old p = .5, new p = .25: r = .5, (r - 1) - ln r = -.5 + ln 2 = .1931472.
  got = L.approx_kl(
    jnp.log(jnp.array([[0.25, 0.9]])), jnp.log(jnp.array([[0.5, 0.1]])), jnp.array([[True, False]])
  )
  close(got, 0.5 + math.log(2) - 1)


# -- aggregation ------------------------------------------------------------------------------

LOSS = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)


@pytest.mark.parametrize(
  "mode,sample,exclude,want",
  [
    ("token-mean", None, True, 2.5),  # (1+2+3+4)/4
    ("seq-mean-token-mean", None, True, 3.0),  # (6/3 + 4/1)/2
    ("seq-mean-token-sum-norm", None, True, 1.25),  # (6/4 + 4/4)/2, max_len 4
    ("token-mean", [False, True], True, 4.0),  # 4/1
    ("token-mean", [False, True], False, 1.0),  # 4/4: row 0's 3 tokens stay in the denominator
    ("seq-mean-token-mean", [False, True], True, 4.0),  # (4/1)/1
    ("seq-mean-token-mean", [False, True], False, 2.0),  # (0 + 4/1)/2
    ("seq-mean-token-sum-norm", [False, True], True, 1.0),  # (4/4)/1
    ("seq-mean-token-sum-norm", [False, True], False, 0.5),  # (4/4)/2
  ],
)
def test_aggregate_hand_values(mode, sample, exclude, want):
  sm = None if sample is None else jnp.array(sample)
  got = L.aggregate(
    LOSS, MASK, mode, sample_mask_B=sm, exclude_masked_from_denominator=exclude, max_len=4
  )
  close(got, want)


@pytest.mark.parametrize("mode", L.AGG_MODES)
def test_aggregate_ignores_padding(mode):
  # Two extra masked columns holding NaN and one all-masked row change nothing.
  loss = jnp.concatenate([LOSS, jnp.full((2, 2), jnp.nan)], 1)
  loss = jnp.concatenate([loss, jnp.full((1, 6), 7.0)], 0)
  mask = jnp.zeros((3, 6), bool).at[:2, :4].set(MASK)
  close(L.aggregate(loss, mask, mode, max_len=4), L.aggregate(LOSS, MASK, mode, max_len=4))


def test_empty_batch_gives_zero_loss():
  got = L.aggregate(LOSS, MASK, "token-mean", sample_mask_B=jnp.array([False, False]))
  assert float(got) == 0.0
  with pytest.raises(ValueError, match="max_len >= 1"):
    L.aggregation_weights(MASK, "seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="'mean'"):
    L.aggregation_weights(MASK, "mean")


# -- entropy selection ------------------------------------------------------------------------


def test_high_entropy_mask_top_rho():
  ent = jnp.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.0]])
  mask = jnp.ones((2, 5), bool)
  # 10 valid tokens, rho .2 -> k = 2: {0.9, 1.0}; rho .25 -> k = ceil(2.5) = 3: {0.8, .9, 1}.
  assert np.argwhere(np.asarray(L.high_entropy_mask(ent, mask, 0.2))).tolist() == [[1, 3], [1, 4]]
  assert int(L.high_entropy_mask(ent, mask, 0.25).sum()) == 3
  # Masked tokens never count, even with the highest entropy: valid = 8 -> k = 2: {.8, .9}.
  mask2 = mask.at[1, 4].set(False).at[0, 0].set(False)
  assert np.argwhere(np.asarray(L.high_entropy_mask(ent, mask2, 0.2))).tolist() == [[1, 2], [1, 3]]
  # Share of valid tokens selected: 2/10.
  close(L.high_entropy_share(L.high_entropy_mask(ent, mask, 0.2), mask), 0.2)
  with pytest.raises(ValueError, match="rho=0"):
    L.high_entropy_mask(ent, mask, 0.0)


# -- diagnostics ------------------------------------------------------------------------------


def test_pearson_matches_numpy():
  k = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k[0], (4, 9))
  y = 0.6 * x + jax.random.normal(k[1], (4, 9))
  mask = jax.random.bernoulli(k[2], 0.7, (4, 9))
  m = np.asarray(mask)
  want = np.corrcoef(np.asarray(x)[m], np.asarray(y)[m])[0, 1]
  close(L.pearson_corr(x, y, mask), want, 1e-5)  # float32 sums over ~25 O(1) terms
  assert float(L.pearson_corr(jnp.ones((2, 3)), y[:2, :3], jnp.ones((2, 3), bool))) == 0.0


def test_connector_entropy_hand_values():
  tokens = jnp.array([[5, 7, 9, 5]])
  ent = jnp.array([[2.0, 1.0, 0.5, 4.0]])
  mask = jnp.array([[True, True, True, False]])
  # connectors {5, 9}: valid ones are tokens 0 (2.0) and 2 (0.5) -> 1.25; rest: token 1 -> 1.0.
  conn, rest = L.connector_entropy(ent, tokens, mask, jnp.array([5, 9]))
  close(conn, 1.25)
  close(rest, 1.0)


@pytest.mark.parametrize("off_policy", [False, True])
def test_logit_grad_norm_equals_autodiff(off_policy):
  k = jax.random.split(jax.random.key(4), 4)
  z = 1.5 * jax.random.normal(k[0], (2, 6, 7))  # tempered logits
  tgt = jax.random.randint(k[1], (2, 6), 0, 7)
  adv = jax.random.normal(k[2], (2, 6))
  stats = L.token_stats_from_logits(z, tgt)
  old = stats.logp_BC
  if off_policy:  # shift old so that some tokens are clipped (r outside [.8, 1.2])
    old = old + 0.4 * jax.random.normal(k[3], (2, 6))

  def per_token_loss_sum(z):
    lp = L.token_stats_from_logits(z, tgt).logp_BC
    return jnp.sum(L.ppo_clip_objective(lp, old, adv, 0.2, 0.2)[0])

  # Token (b, t)'s loss depends only on z[b, t], so the gradient of the sum is per token.
  want = jnp.linalg.norm(jax.jit(jax.grad(per_token_loss_sum))(z), axis=-1)
  _, clip = L.ppo_clip_objective(stats.logp_BC, old, adv, 0.2, 0.2)
  ratio = jnp.exp(stats.logp_BC - old) if off_policy else None
  got = L.logit_grad_norm(adv, stats.logp_BC, stats.sum_p2_BC, clip.any_BC, ratio)
  close(got, want, 1e-5)  # sqrt(1 - 2 p_a + q) vs a 7-term norm: a few float32 ulps
  if off_policy:
    assert bool(clip.any_BC.any()) and bool((got[clip.any_BC] == 0).all())


# -- LossConfig and the loss composition ------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"eps_low": 1.0}, "eps_low=1.0"),
    ({"eps_high": -0.1}, "eps_high=-0.1"),
    ({"dual_clip_c": 1.0}, "dual_clip_c=1.0"),
    ({"kl_kind": "k5"}, "kl_kind='k5'"),
    ({"kl_coef": 0.1}, "kl_coef=0.1 > 0 but kl_kind is None"),
    ({"agg_mode": "sum"}, "agg_mode='sum'"),
    ({"agg_mode": "seq-mean-token-sum-norm"}, "max_len_norm >= 1"),
    ({"entropy_select": "top"}, "entropy_select='top'"),
    ({"rho": 1.5}, "rho=1.5"),
    ({"high_entropy_weight": 0.0}, "high_entropy_weight=0.0"),
    ({"vocab_chunk": 0}, "vocab_chunk=0"),
  ],
)
def test_loss_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    L.LossConfig(**kwargs)


@pytest.fixture(scope="module")
def batch():
  k = jax.random.split(jax.random.key(5), 6)
  B, T = 4, 6
  logp = -jax.random.uniform(k[0], (B, T), minval=0.1, maxval=3.0)
  old = logp + 0.3 * jax.random.normal(k[1], (B, T))
  ref = logp + 0.3 * jax.random.normal(k[2], (B, T))
  ent = jax.random.uniform(k[3], (B, T), maxval=2.0)
  adv = jnp.array([1.0, 0.0, 0.5, 2.0])
  lengths = jnp.array([6, 3, 4, 1])
  mask = jnp.arange(T)[None, :] < lengths[:, None]
  return dict(logp=logp, old=old, ref=ref, ent=ent, adv=adv, mask=mask)


# The production composition (the train step's): weights and selection for the whole batch,
# then sum w * l. One compilation per config instead of one per primitive (eager).
@functools.partial(jax.jit, static_argnums=(1,))
def _loss_jit(b, cfg, sample):
  weight, select = L.loss_weights(b["mask"], sample, b["ent"], cfg)
  adv = jnp.broadcast_to(b["adv"][:, None], b["logp"].shape)
  loss, sums = L.batch_loss(b["logp"], b["ent"], b["old"], b["ref"], adv, weight, select, cfg)
  total = jnp.sum(weight)
  return loss, {k: v / jnp.where(total > 0, total, 1.0) for k, v in sums.items()}


def _loss(b, cfg, sample=None):
  return _loss_jit(b, cfg, sample)


def test_batch_loss_composes_the_parts(batch):
  b = batch
  cfg = L.LossConfig(eps_high=0.28, kl_kind="k3", kl_coef=0.1, entropy_coef=0.01)
  loss, metrics = _loss(b, cfg)
  adv = jnp.broadcast_to(b["adv"][:, None], b["logp"].shape)
  pg, clip = L.ppo_clip_objective(b["logp"], b["old"], adv, 0.2, 0.28)
  want = (
    L.aggregate(pg, b["mask"], "token-mean")
    + 0.1 * L.aggregate(L.kl_k3(b["logp"], b["ref"]), b["mask"], "token-mean")
    - L.entropy_bonus(b["ent"], b["mask"], 0.01)
  )
  close(loss, want)
  # token-mean weights are uniform over the valid tokens: the loss-weighted means are the
  # plain masked means.
  close(metrics["clip_frac"], L.clip_fractions(clip, b["mask"])["clip_frac"])
  close(metrics["approx_kl"], L.approx_kl(b["logp"], b["old"], b["mask"]))
  assert set(metrics) == set(L.TOKEN_STAT_NAMES)
  # The KL term needs reference logprobs.
  w, s = L.loss_weights(b["mask"], None, b["ent"], cfg)
  with pytest.raises(ValueError, match="needs ref_logp_BC"):
    L.batch_loss(b["logp"], b["ent"], b["old"], None, adv, w, s, cfg)


def test_batch_loss_restrict_and_reweight(batch):
  b = batch
  high = L.high_entropy_mask(b["ent"], b["mask"], 0.25)
  adv = jnp.broadcast_to(b["adv"][:, None], b["logp"].shape)
  pg, _ = L.ppo_clip_objective(b["logp"], b["old"], adv, 0.2, 0.2)
  w = L.aggregation_weights(b["mask"], "token-mean")
  # restrict: only high tokens in the numerator, every valid token in the denominator.
  got, _ = _loss(b, L.LossConfig(entropy_select="restrict", rho=0.25))
  close(got, jnp.sum(jnp.where(high, pg, 0.0) * w))
  got, _ = _loss(b, L.LossConfig(entropy_select="reweight", rho=0.25, high_entropy_weight=3.0))
  close(got, jnp.sum(jnp.where(high, 3.0, 1.0) * pg * w))


@pytest.mark.parametrize("mode", L.AGG_MODES)
def test_batch_loss_ignores_padding(batch, mode):
  b = batch
  cfg = L.LossConfig(
    agg_mode=mode,
    max_len_norm=8,
    kl_kind="k2",
    kl_coef=0.05,
    entropy_coef=0.02,
    entropy_select="reweight",
  )
  pad = lambda x, v: jnp.concatenate([x, jnp.full((x.shape[0], 3), v, x.dtype)], 1)
  padded = dict(
    logp=pad(b["logp"], -1.0),
    old=pad(b["old"], 5.0),
    ref=pad(b["ref"], jnp.nan),
    ent=pad(b["ent"], 9.0),
    adv=b["adv"],
    mask=pad(b["mask"], False),
  )
  l0, m0 = _loss(b, cfg)
  l1, m1 = _loss(padded, cfg)
  close(l1, l0)
  for k in L.TOKEN_STAT_NAMES:
    close(m1[k], m0[k])


def test_positive_only_gradient_exactly_zero_on_excluded_rows(batch):
  b = batch
  sample = jnp.array([True, False, True, False])
  adv = jnp.broadcast_to(b["adv"][:, None], b["logp"].shape)
  for exclude in (True, False):
    cfg = L.LossConfig(
      kl_kind="k3",
      kl_coef=0.1,
      entropy_coef=0.01,
      entropy_select="reweight",
      exclude_masked_from_denominator=exclude,
    )
    w, s = L.loss_weights(b["mask"], sample, b["ent"], cfg)

    def f(logp, ent, cfg=cfg, w=w, s=s):
      return L.batch_loss(logp, ent, b["old"], b["ref"], adv, w, s, cfg)[0]

    g_lp, g_ent = jax.grad(f, (0, 1))(b["logp"], b["ent"])
    for g in (g_lp, g_ent):
      assert np.all(np.asarray(g)[~np.asarray(sample)] == 0.0)  # exactly zero, not just small
      assert np.any(np.asarray(g)[np.asarray(sample)] != 0.0)
  # Counting excluded rows' tokens in the denominator (token-mean): included rows 0 and 2
  # have 6 + 4 = 10 tokens, all rows 6 + 3 + 4 + 1 = 14, so the loss scales by 10/14.
  l_ex = _loss(b, L.LossConfig(), sample)[0]
  l_in = _loss(b, L.LossConfig(exclude_masked_from_denominator=False), sample)[0]
  close(l_in, l_ex * 10 / 14)


def test_batch_loss_is_the_sum_over_micro_batches(batch):
  # The train step's form: weights for the whole batch, then sum(w * l) per micro-batch.
  b = batch
  cfg = L.LossConfig(agg_mode="seq-mean-token-mean", kl_kind="k1", kl_coef=0.2, entropy_coef=0.1)
  cfg = dataclasses.replace(cfg, entropy_select="restrict")
  w, s = L.loss_weights(b["mask"], None, b["ent"], cfg)
  adv = jnp.broadcast_to(b["adv"][:, None], b["logp"].shape)
  whole, _ = L.batch_loss(b["logp"], b["ent"], b["old"], b["ref"], adv, w, s, cfg)
  parts = [
    L.batch_loss(*(x[i : i + 2] for x in (b["logp"], b["ent"], b["old"], b["ref"], adv, w, s)), cfg)
    for i in (0, 2)
  ]
  close(parts[0][0] + parts[1][0], whole)
  close(whole, _loss(b, cfg)[0])
