"""The jitted train step: micro-batching is exact, PPO epochs, non-finite skip, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_model import dot_operand_dtypes

from egrc_jax import losses
from egrc_jax import train as train_lib
from egrc_jax.model import get_preset, positions_from_mask
from egrc_jax.sharding import batch_sharding, init_model, make_mesh
from egrc_jax.train import (
  Batch,
  OptimConfig,
  completion_logprobs,
  init_state_sharded,
  lr_schedule,
  make_optimizer,
  make_train_step,
)

B, TP, C = 8, 6, 5


def make_batch(seed=0, adv_scale=1.0, pad_ref=0.0):
  rng = np.random.default_rng(seed)
  cfg = get_preset("tiny")
  prompt_mask = np.ones((B, TP), bool)
  prompt_mask[::2, :2] = False  # left padding on half the rows
  comp_mask = np.ones((B, C), bool)
  comp_mask[1, 3:] = False  # a row that stopped early
  mask = np.concatenate([prompt_mask, comp_mask], 1)
  tokens = rng.integers(0, cfg.vocab_size, (B, TP + C)).astype(np.int32)
  keep = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)  # stage-1 style excluded rows
  weight = np.asarray(
    losses.aggregation_weights(comp_mask, "token-mean", sample_mask_B=keep), np.float32
  )
  return Batch(
    tokens_BS=tokens,
    segments_BS=mask.astype(np.int32),
    positions_BS=np.asarray(positions_from_mask(mask)),
    targets_BC=tokens[:, TP:],
    completion_BC=comp_mask,
    old_logp_BC=np.full((B, C), -5.3, np.float32),
    sampler_logp_BC=np.full((B, C), -5.3, np.float32),
    ref_logp_BC=np.where(weight == 0, pad_ref, -5.0).astype(np.float32),
    adv_BC=np.repeat(adv_scale * rng.normal(size=(B, 1)), C, 1).astype(np.float32),
    weight_BC=weight,
    select_BC=np.ones((B, C), np.float32),
    head_start=TP - 1,
  )


def run(micro_batches, mesh=None, epochs=1, batch=None, steps=1, adam=False, loss_cfg=None):
  """One train step. Plain SGD (optax.identity) by default, so params - lr * grad compares
  gradients directly; Adam's first step (~ lr * sign(g)) would amplify rounding."""
  model = init_model(get_preset("tiny"), mesh, seed=0)
  opt = OptimConfig(lr=1e-2, warmup_steps=0)
  tx = make_optimizer(opt) if adam else optax.identity()
  state, sh = init_state_sharded(nnx.state(model, nnx.Param), tx, mesh)
  step = make_train_step(
    nnx.graphdef(model),
    tx,
    loss_cfg or losses.LossConfig(vocab_chunk=96),
    micro_batch_rows=B // micro_batches,
    ppo_epochs=epochs,
    mesh=mesh,
    state_sharding=sh,
  )
  batch = make_batch() if batch is None else batch
  if mesh is not None:
    batch = jax.device_put(batch, batch_sharding(mesh))
  for _ in range(steps):
    state, metrics = step(state, batch, jnp.float32(1.0), jnp.float32(1e-2))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def whole():
  return run(1)


def test_micro_batches_give_the_full_batch_update(whole):
  # Weights are computed for the whole batch, so sum over micro-batches of sum(w l) is the
  # same loss; only float32 summation order differs (1e-5 relative; params: lr * 1e-6).
  split, m_split = run(4)
  state, m = whole
  np.testing.assert_allclose(m_split["loss"], m["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_split["grad_norm"], m["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(split.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-8)
  assert int(state.step) == 1 and bool(m["finite"])


def test_sharded_step_matches_one_device(whole):
  mesh = make_mesh(fsdp=2, tensor=4)
  sharded, m = run(2, mesh)
  state, m1 = whole
  np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(sharded.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-8)


def test_ppo_epochs_take_several_steps(whole):
  two, m = run(1, epochs=2)
  assert int(two.step) == 2
  moved = [
    np.abs(a - b).max()
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(whole[0].params), strict=True)
  ]
  assert max(moved) > 0  # the second epoch changed the params further
  # The first epoch's metrics are reported (on-policy); the last epoch's norm too.
  np.testing.assert_allclose(m["grad_norm"], whole[1]["grad_norm"], rtol=1e-6)
  assert m["grad_norm_last"] != m["grad_norm"]


def test_non_finite_batch_leaves_state_untouched():
  bad = make_batch(adv_scale=np.nan)
  state, m = run(1, batch=bad, adam=True)
  fresh = init_model(get_preset("tiny"), None, seed=0)
  assert not bool(m["finite"]) and int(state.step) == 0
  for a, b in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(nnx.state(fresh, nnx.Param)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_value_on_a_zero_weight_token_keeps_the_step():
  # k3's exp(ref - logp) overflows where ref = 200 (a pad slot with weight 0): the loss used
  # to sum inf * 0 = NaN there and skip the whole update. Now the step is the clean one.
  kl = losses.LossConfig(vocab_chunk=96, kl_kind="k3", kl_coef=0.1)
  clean_state, clean = run(1, batch=make_batch(pad_ref=0.0), loss_cfg=kl)
  state, m = run(2, batch=make_batch(pad_ref=200.0), loss_cfg=kl)
  assert bool(m["finite"]) and int(state.step) == 1
  # Same loss and update as with a harmless pad value (float32 summation order: 1e-5).
  np.testing.assert_allclose(m["loss"], clean["loss"], rtol=1e-5)
  np.testing.assert_allclose(m["loss_weighted/kl"], clean["loss_weighted/kl"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(clean_state.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-8)


def test_micro_batches_take_strided_rows():
  x = np.arange(12)
  mbs = train_lib._split(x, 3)
  # Micro-batch j holds rows j, j + 3, j + 6, j + 9: one row from each block of 3.
  assert np.asarray(mbs).tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
  np.testing.assert_array_equal(train_lib._unsplit(mbs), x)


def test_logprobs_pass_micro_batched_equals_whole():
  model = init_model(get_preset("tiny"), None, seed=0)
  params, gd = nnx.state(model, nnx.Param), nnx.graphdef(model)
  batch = make_batch()
  whole = train_lib.logprobs_pass(gd, params, batch, 0.7, 96, micro_batch_rows=0)
  split = jax.jit(lambda p, b: train_lib.logprobs_pass(gd, p, b, 0.7, 96, micro_batch_rows=2))(
    params, batch
  )
  # The same rows, computed in 4 groups of 2: float32 rounding only.
  np.testing.assert_allclose(split, whole, atol=1e-5)


def test_sampler_learner_metrics_hand_values():
  learner = np.log(np.array([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]], np.float32))
  sampler = np.log(np.array([[0.5, 0.5, 0.9], [0.2, 0.9, 0.3]], np.float32))
  mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
  m = train_lib.sampler_learner_metrics(learner, sampler, mask)
  # |d log p| on the 4 valid tokens: 0, ln 2, 0, ln 2 (the masked 0.2 vs 0.9 is ignored).
  np.testing.assert_allclose(m["sampler_learner/max_abs_logp_diff"], np.log(2), rtol=1e-6)
  np.testing.assert_allclose(m["sampler_learner/mean_abs_logp_diff"], np.log(2) / 2, rtol=1e-6)
  x, y = np.array([0.5, 0.5, 0.9, 0.2]), np.array([0.5, 0.25, 0.9, 0.1])
  np.testing.assert_allclose(m["sampler_learner/prob_pearson"], np.corrcoef(x, y)[0, 1], rtol=1e-5)


def test_weighted_statistics_are_nan_without_weight():
  # Stage 1 with no R > 0 row: nothing gets gradient; its weighted means are NaN, not 0.
  b = make_batch()
  b = b.replace(weight_BC=np.zeros_like(b.weight_BC))
  state, m = run(1, batch=b)
  assert bool(m["finite"]) and float(m["loss"]) == 0.0
  assert np.isnan(m["loss_weighted/entropy"]) and np.isnan(m["loss_weighted/ratio"])


def test_lr_schedule_warmup_then_cosine():
  f = lr_schedule(OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1), total_steps=6)
  # warmup: (t+1)/2 -> 0.5, 1.0; cosine over 4 steps: 1, 0.1+0.9*(1+cos(pi/4))/2, ...
  expected = [
    0.5,
    1.0,
    1.0,
    0.1 + 0.45 * (1 + np.cos(np.pi / 4)),
    0.55,
    0.1 + 0.45 * (1 + np.cos(3 * np.pi / 4)),
    0.1,
    0.1,
  ]
  np.testing.assert_allclose([f(t) for t in range(8)], expected, atol=1e-12)


def test_remat_changes_memory_not_the_update():
  # Same computation, recomputed in the backward pass: identical up to float32 reordering.
  model = init_model(get_preset("tiny"), None, seed=0)
  params = nnx.state(model, nnx.Param)
  from egrc_jax.train import completion_logprobs

  batch = make_batch()

  def loss(p, remat):
    logp, ent = completion_logprobs(p, nnx.graphdef(model), batch, 1.0, 96, remat)
    return jnp.sum(logp) + jnp.sum(ent)

  g0 = jax.grad(loss)(params, False)
  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bfloat16_learner_gradient_runs_every_matmul_in_bfloat16():
  """float32 params, bfloat16 compute: the learner's forward and backward (blocked
  attention, remat, vocab-chunked logprobs) feed only bfloat16 operands to matmuls."""
  cfg = get_preset("tiny", param_dtype="float32", dtype="bfloat16", attention_impl="blocked")
  model = init_model(cfg, None, seed=0)
  params = nnx.state(model, nnx.Param)
  batch = make_batch()

  def loss(p):
    logp, ent = completion_logprobs(p, nnx.graphdef(model), batch, 1.0, 96, True)
    return jnp.sum(logp) + jnp.sum(ent)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  assert dot_operand_dtypes(jaxpr) == {("bfloat16", "bfloat16")}
  grads = jax.eval_shape(jax.grad(loss), params)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype("float32")}  # param dtype
