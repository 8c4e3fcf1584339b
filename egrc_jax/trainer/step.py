"""One RL step, and one evaluation, as functions of a StagePlan and the policy params.

    rl_step(stage, state, examples, lr, seed, *, graphdef, grader, ref_params, programs, ...)
      prompts --sampler.generate_state(graphdef, state.params)--> rollout
      --grader.grade_rollout--> correct --compute_rewards(stage.reward)--> rewards
      --batch.advantages(stage.advantage)--> A, keep --batch.make_batch(stage.loss)--> Batch
      --programs.logprobs(ref_params) [KL]--> ref logp
      --programs.logprobs(state.params) [recompute_old_logprobs]--> old logp
      --programs.train_step(stage.loss)(state, batch, stage.temperature, lr)--> state, metrics

The sampler reads the live params of the state (no module to re-point after the donated
update), and the loss uses the temperature of the same `stage.sampling` the sampler used.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax import sampler
from egrc_jax.losses import LossConfig
from egrc_jax.rewards import compute_rewards
from egrc_jax.sharding import batch_sharding, to_host
from egrc_jax.train import (
  TrainState,
  init_state_sharded,
  lr_schedule,
  make_logprobs_pass,
  make_optimizer,
  make_train_step,
)
from egrc_jax.trainer import batch as batch_lib
from egrc_jax.trainer import diagnostics
from egrc_jax.trainer.plan import EvalPlan, OptimPlan, StagePlan


class Programs:
  """The run's compiled programs, built once: one train step per distinct stage loss (most
  arms have one; the lr is a step argument, so stages that differ only in their schedule
  share it) and one logprob pass (the reference, and recomputed old logprobs)."""

  def __init__(self, graphdef, params: nnx.State, optim: OptimPlan, vocab_chunk: int, mesh):
    self.graphdef, self.optim, self.mesh = graphdef, optim, mesh
    self.tx = make_optimizer(optim.adamw)
    self.state_sharding = None if mesh is None else init_state_sharded(params, self.tx, mesh)[1]
    self.logprobs = make_logprobs_pass(graphdef, vocab_chunk, optim.micro_batch_rows, mesh)
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    # Without micro-batches, packed rows come in buckets of this many (one row per data
    # shard); with them, a packed batch has the rollout's rows (trainer/batch.py).
    self.rows_multiple = shards
    self._train: dict[LossConfig, object] = {}

  def fresh_state(self, params: nnx.State) -> TrainState:
    """A TrainState of `params` with a fresh optimizer (every stage starts with one)."""
    return init_state_sharded(params, self.tx, self.mesh)[0]

  def train_step(self, loss: LossConfig):
    if loss not in self._train:
      o = self.optim
      self._train[loss] = make_train_step(
        self.graphdef,
        self.tx,
        loss,
        micro_batch_rows=o.micro_batch_rows,
        ppo_epochs=o.ppo_epochs,
        remat=o.remat,
        mesh=self.mesh,
        state_sharding=self.state_sharding,
      )
    return self._train[loss]

  def lr(self, stage: StagePlan, stage_step: int) -> float:
    """The stage's learning rate at its RL step `stage_step` (every PPO epoch shares it)."""
    return lr_schedule(self.optim.adamw, stage.steps)(stage_step)


def rl_step(
  stage: StagePlan,
  state: TrainState,
  examples: list[dict],
  lr: float,
  seed: int,
  *,
  graphdef,
  grader,
  ref_params,
  programs: Programs,
  num_samples: int,
  mesh=None,
  connector_ids=(),
) -> tuple[TrainState, dict]:
  """One RL step of `stage` on `examples` ({prompt_ids, gold}); returns (state, metrics)."""
  G = num_samples
  t0 = time.time()
  prompts = [e["prompt_ids"] for e in examples]
  golds = [e["gold"] for e in examples]
  rollout = to_host(
    sampler.generate_state(
      graphdef, state.params, prompts, stage.sampling, num_samples=G, seed=seed, mesh=mesh
    )
  )
  t1 = time.time()
  correct = grader.grade_rollout(rollout, [g for g in golds for _ in range(G)])
  t2 = time.time()
  P = len(prompts)
  lengths_PG = np.asarray(rollout.lengths_B).reshape(P, G)
  trunc_PG = np.asarray(rollout.truncated_B).reshape(P, G)
  rewards = compute_rewards(stage.reward, correct.reshape(P, G), lengths_PG, trunc_PG)
  adv_PG, keep_PG = batch_lib.advantages(stage.advantage, rewards)
  layout, multiple = programs.optim.layout, programs.rows_multiple
  batch = batch_lib.make_batch(
    rollout, adv_PG, keep_PG, stage.loss, layout, multiple, programs.optim.micro_batch_rows
  )
  if mesh is not None:
    batch = jax.device_put(batch, batch_sharding(mesh))
  temperature = jnp.float32(stage.temperature)
  ref_time = old_time = 0.0
  if stage.loss.kl_kind is not None:
    tr = time.time()
    ref = programs.logprobs(ref_params, batch, temperature)
    batch = batch.replace(ref_logp_BC=jax.block_until_ready(ref))
    ref_time = time.time() - tr
  if stage.recompute_old_logprobs:
    tr = time.time()
    old = programs.logprobs(state.params, batch, temperature)
    batch = batch.replace(old_logp_BC=jax.block_until_ready(old))
    old_time = time.time() - tr
  t3 = time.time()
  state, m = programs.train_step(stage.loss)(state, batch, temperature, jnp.float32(lr))
  m = to_host(m)
  t4 = time.time()
  metrics = {k: float(v) for k, v in m.items()}
  metrics.update(rewards.metrics())
  metrics.update(diagnostics.rollout_metrics(rollout, correct, connector_ids, stage.loss.rho))
  metrics.update(
    {
      "stage": stage.name,
      "optim/lr": lr,
      "temperature": stage.temperature,
      "advantage/mean": float(adv_PG.mean()),
      "advantage/kept_share": float(keep_PG.mean()),
      "learner/rows": batch.tokens_BS.shape[0],
      "learner/fill": float(np.sum(batch.segments_BS > 0) / batch.segments_BS.size),
      "time/rollout": t1 - t0,
      "time/grading": t2 - t1,
      "time/reference": ref_time,
      "time/old_logprobs": old_time,
      "time/update": t4 - t3,
      "time/step": t4 - t0,
      "throughput/rollout_tokens_per_s": float(np.sum(rollout.lengths_B)) / max(t1 - t0, 1e-9),
    }
  )
  return state, metrics


def evaluate_policy(
  ev: EvalPlan, examples: list[dict], graphdef, params, grader, seed: int, mesh=None
) -> dict[str, float]:
  """Accuracy, mean length and truncation rate of `params` on `examples` (eval.num_samples
  samples each, the evaluation's own sampling settings), in batches of eval.batch_prompts
  prompts (the last one padded with repeats of its last prompt, whose rows are dropped)."""
  n = ev.num_samples
  correct, lengths, truncated = [], [], []
  for i, (start, stop) in enumerate(ev.batches(len(examples))):
    batch = examples[start:stop]
    pad = (ev.batch_prompts - len(batch)) if ev.batch_prompts else 0
    prompts = [e["prompt_ids"] for e in batch] + [batch[-1]["prompt_ids"]] * pad
    rollout = to_host(
      sampler.generate_state(
        graphdef, params, prompts, ev.sampling, num_samples=n, seed=seed + i, mesh=mesh
      )
    )
    if pad:
      rows = len(batch) * n
      rollout = jax.tree.map(lambda x, rows=rows: x[:rows], rollout)
    correct.append(grader.grade_rollout(rollout, [e["gold"] for e in batch for _ in range(n)]))
    lengths.append(np.asarray(rollout.lengths_B))
    truncated.append(np.asarray(rollout.truncated_B))
  return {
    "accuracy": float(np.concatenate(correct).mean()),
    "length": float(np.concatenate(lengths).mean()),
    "truncated": float(np.concatenate(truncated).mean()),
  }
