"""The packed learner layout against the padded one: the same loss, gradients and metrics
(float32 summation order only), for every aggregation mode, positive-only rows and KL."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from egrc_jax import losses
from egrc_jax import train as train_lib
from egrc_jax.model import get_preset
from egrc_jax.sampler import Rollout
from egrc_jax.sharding import batch_sharding, init_model, make_mesh
from egrc_jax.train import init_state_sharded, logprobs_pass, make_train_step
from egrc_jax.trainer import batch as batch_lib

# 6 rollout rows, prompts of 2-6 real tokens in a bucket of 6, completions of 1-8 of 8.
B, TP, C = 6, 6, 8
PLEN = np.array([6, 2, 4, 3, 5, 2])
CLEN = np.array([8, 1, 5, 3, 8, 2])
# Tolerances: float32, the same sums in another order (attention over other row layouts,
# other micro-batch sums): observed ~1e-7 relative; 1e-5 allows for it.
RTOL, ATOL = 1e-5, 1e-6


def rollout(seed=0) -> Rollout:
  rng = np.random.default_rng(seed)
  V = get_preset("tiny").vocab_size
  pmask = np.arange(TP)[None, :] >= (TP - PLEN)[:, None]  # left padded
  cmask = np.arange(C)[None, :] < CLEN[:, None]
  f = lambda: np.where(cmask, rng.normal(size=(B, C)) - 3.0, 0.0).astype(np.float32)
  return Rollout(
    prompt_tokens_BTp=np.where(pmask, rng.integers(1, V, (B, TP)), 0).astype(np.int32),
    prompt_mask_BTp=pmask,
    completion_tokens_BC=np.where(cmask, rng.integers(1, V, (B, C)), 0).astype(np.int32),
    completion_mask_BC=cmask,
    lengths_B=CLEN.astype(np.int32),
    truncated_B=CLEN == C,
    logprobs_BC=f(),
    policy_logprobs_BC=f(),
    entropy_BC=np.abs(f()),
    tempered_logprobs_BC=f(),
    tempered_entropy_BC=np.abs(f()),
    prompt_index_B=np.arange(B, dtype=np.int32) // 2,
    num_samples=2,
  )


def test_pack_rows_first_fit_decreasing_by_hand():
  # Lengths 5, 3, 4, 2 in rows of 8: 5 -> row 0 (3 left); 4 -> row 1; 3 -> row 0 at 5;
  # 2 -> row 1 at 4.
  row, off, n = batch_lib.pack_rows(np.array([5, 3, 4, 2]), 8)
  assert (row.tolist(), off.tolist(), n) == ([0, 0, 1, 1], [0, 5, 0, 4], 2)
  with pytest.raises(ValueError, match="9 tokens does not fit a learner row of 8"):
    batch_lib.pack_rows(np.array([9]), 8)
  # Buckets of 2 x (1, 2, 3, 4, 6, 8, ...) rows, capped at 12: 5 -> 6, 7 -> 8, 9 -> 12.
  got = [batch_lib.bucket_rows(n, 2, 12) for n in (1, 2, 3, 5, 7, 9, 13)]
  assert got == [2, 2, 4, 6, 8, 12, 12]
  got = [batch_lib.bucket_rows(n, 1, 10**6) for n in (13, 17, 25, 33, 41, 49, 65)]
  assert got == [16, 24, 32, 48, 48, 64, 96]


def test_packed_batch_holds_each_sequence_once():
  r = rollout()
  keep = np.ones((3, 2), bool)
  adv = np.arange(6, dtype=np.float32).reshape(3, 2)
  pad = batch_lib.make_batch(r, adv, keep, losses.LossConfig(), "padded")
  pk = batch_lib.make_batch(r, adv, keep, losses.LossConfig(), "packed", rows_multiple=1)
  # 6 sequences of 14, 3, 9, 6, 13, 4 tokens in rows of 14: [14], [13], [9, 4], [6, 3] -> 4.
  assert pk.tokens_BS.shape == (4, TP + C) and pk.head_start == 0
  assert int((pk.segments_BS > 0).sum()) == int((pad.segments_BS > 0).sum()) == 49
  assert int(pk.completion_BC.sum()) == int(pad.completion_BC.sum()) == CLEN.sum()
  # The same targets, advantages and weights, token for token (order aside).
  for k in ("targets_BC", "adv_BC", "weight_BC", "old_logp_BC", "sampler_logp_BC"):
    a = np.sort(np.asarray(getattr(pad, k))[pad.completion_BC])
    b = np.sort(np.asarray(getattr(pk, k))[pk.completion_BC])
    np.testing.assert_array_equal(a, b, err_msg=k)
  # Positions restart at 0 with each sequence.
  starts = (pk.positions_BS == 0) & (pk.segments_BS > 0)
  assert int(starts.sum()) == B


def _step(batch, loss_cfg, mesh=None, micro_batch_rows=0):
  model = init_model(get_preset("tiny"), mesh, seed=0)
  tx = optax.sgd(1e-2)  # plain SGD: params - lr * grad compares the gradients themselves
  state, sh = init_state_sharded(nnx.state(model, nnx.Param), tx, mesh)
  step = make_train_step(
    nnx.graphdef(model), tx, loss_cfg, micro_batch_rows=micro_batch_rows, mesh=mesh,
    state_sharding=sh,
  )  # fmt: skip
  if mesh is not None:
    batch = jax.device_put(batch, batch_sharding(mesh))
  state, m = step(state, batch, jnp.float32(0.8), jnp.float32(1.0))
  return jax.device_get(state.params), jax.device_get(m)


def _compare(loss_cfg, keep, mesh=None, micro=(0, 0), rows_multiple=2):
  r = rollout()
  adv = np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)
  packed = batch_lib.make_batch(r, adv, keep, loss_cfg, "packed", rows_multiple, micro[1])
  batches = {"padded": batch_lib.make_batch(r, adv, keep, loss_cfg, "padded"), "packed": packed}
  if loss_cfg.kl_kind is not None:  # reference logprobs of other params, in each layout
    ref_model = init_model(get_preset("tiny"), None, seed=1)
    ref, gd = nnx.state(ref_model, nnx.Param), nnx.graphdef(ref_model)
    for k, b in batches.items():
      batches[k] = b.replace(ref_logp_BC=np.asarray(logprobs_pass(gd, ref, b, 0.8, 96)))
  (p_pad, m_pad), (p_pk, m_pk) = (
    _step(batches[k], loss_cfg, mesh, mb) for k, mb in zip(("padded", "packed"), micro, strict=True)
  )
  for key in ("loss", "grad_norm", *[f"loss_weighted/{k}" for k in losses.TOKEN_STAT_NAMES]):
    np.testing.assert_allclose(m_pk[key], m_pad[key], rtol=RTOL, atol=ATOL, err_msg=key)
  for key in ("sampler_learner/mean_abs_logp_diff", "sampler_learner/max_abs_logp_diff"):
    np.testing.assert_allclose(m_pk[key], m_pad[key], rtol=RTOL, err_msg=key)
  for a, b in zip(jax.tree.leaves(p_pad), jax.tree.leaves(p_pk), strict=True):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-8)
  assert np.isfinite(m_pk["loss"]) and float(m_pk["grad_norm"]) > 0
  return m_pad, m_pk


# Stage 1's positive-only rows (rows 1 and 4 have R = 0) with each aggregation mode, and
# both denominator rules; entropy selection and the entropy bonus on.
POSITIVE_ONLY = np.array([[True, False], [True, True], [False, True]])


@pytest.mark.parametrize(
  "mode,exclude",
  [("token-mean", True), ("seq-mean-token-mean", False), ("seq-mean-token-sum-norm", True)],
)
def test_packed_equals_padded_per_aggregation_mode(mode, exclude):
  cfg = losses.LossConfig(
    agg_mode=mode, max_len_norm=C, vocab_chunk=96, entropy_coef=0.01, entropy_select="reweight",
    rho=0.3, exclude_masked_from_denominator=exclude,
  )  # fmt: skip
  _compare(cfg, POSITIVE_ONLY)


def test_packed_equals_padded_with_kl_on_a_mesh_in_micro_batches():
  cfg = losses.LossConfig(vocab_chunk=96, kl_kind="k3", kl_coef=0.1)
  mesh = make_mesh(fsdp=2, tensor=4)
  # Padded: 6 rows in 3 micro-batches of 2; packed: 4 filled rows in 2 of 2, and a third,
  # empty one that the step skips (the token budget of a micro-batch is 2 rows of Tp + C
  # slots either way).
  m_pad, m_pk = _compare(cfg, np.ones((3, 2), bool), mesh=mesh, micro=(2, 2))
  assert m_pk["loss_weighted/kl"] > 0


def test_empty_rows_of_a_bucket_form_whole_micro_batches_that_the_step_skips():
  # R = 6 rows, micro-batches of b = 2 (m = 3, micro-batch j = rows j, j + 3): packed row r
  # goes to row (r % 2) * 3 + r // 2, so micro-batch j holds packed rows 2j, 2j + 1.
  assert batch_lib.micro_batch_major(6, 2).tolist() == [0, 3, 1, 4, 2, 5]
  assert batch_lib.micro_batch_major(4, 0).tolist() == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="5 learner rows do not split into micro-batches of 2"):
    batch_lib.micro_batch_major(5, 2)
  r, keep = rollout(), np.ones((3, 2), bool)
  adv = np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)
  # 4 filled rows (see above) in a bucket of 6: the last micro-batch of 2 is empty.
  pk = batch_lib.make_batch(r, adv, keep, losses.LossConfig(), "packed", 6, 2)
  per_mb = np.asarray(train_lib._split(pk, 3).completion_BC).reshape(3, -1).sum(1)
  assert per_mb[:2].min() > 0 and per_mb[2] == 0 and per_mb.sum() == CLEN.sum()
  assert train_lib.computed_micro_batches(pk, 2) == 2
  # The skip: a function that would give inf on an empty micro-batch is not computed there.
  inv = lambda mb: 1.0 / jnp.sum(mb.completion_BC)
  mbs = train_lib._split(jax.tree.map(jnp.asarray, pk), 3)
  got = jax.lax.map(lambda mb: train_lib._unless_empty(inv, mb), mbs)
  np.testing.assert_allclose(np.asarray(got), [1 / per_mb[0], 1 / per_mb[1], 0.0], rtol=1e-6)
  # And the step over that bucket equals the padded step (KL on, positive-only rows).
  cfg = losses.LossConfig(vocab_chunk=96, kl_kind="k3", kl_coef=0.1)
  _compare(cfg, POSITIVE_ONLY, micro=(2, 2), rows_multiple=6)


def test_with_micro_batches_a_packed_batch_keeps_every_rollout_row_at_no_cost_in_bits():
  # With micro-batches the packed batch has the rollout's 6 rows whatever rows_multiple says
  # (one compile per run, not one per bucket); without, it is bucketed.
  r, keep = rollout(), np.ones((3, 2), bool)
  adv = np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)
  cfg = losses.LossConfig(vocab_chunk=96)
  pk = batch_lib.make_batch(r, adv, keep, cfg, "packed", rows_multiple=2, micro_batch_rows=2)
  assert pk.tokens_BS.shape[0] == 6 and train_lib.computed_micro_batches(pk, 2) == 2
  assert batch_lib.make_batch(r, adv, keep, cfg, "packed", 2, 0).tokens_BS.shape[0] == 4
  # The same step over the 4 filled rows alone (the smallest bucket, in the same
  # micro-batches: rows 0, 3 and 1, 4 of the 6-row split are rows 0, 2 and 1, 3 of the
  # 4-row one) gives the same parameters and loss, bit for bit: a skipped micro-batch
  # passes the gradient sums through.
  four = jax.tree.map(lambda x: x[np.array([0, 1, 3, 4])] if np.ndim(x) else x, pk)
  assert train_lib.computed_micro_batches(four, 2) == 2
  (p6, m6), (p4, m4) = _step(pk, cfg, None, 2), _step(four, cfg, None, 2)
  assert float(m6["loss"]) == float(m4["loss"]) and float(m6["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(p6), jax.tree.leaves(p4), strict=True):
    np.testing.assert_array_equal(a, b)
