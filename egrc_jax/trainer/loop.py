"""The RL loop: stages of rollout -> grading -> rewards -> advantages -> update.

`Trainer(config, workdir).run()` runs config.arm's stages back to back (the second from the
first's final params), checkpoints every `checkpoint.every` steps, at every stage end and on
SIGTERM, and resumes from the latest checkpoint in the workdir when re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax import sampler
from egrc_jax.cli import UserError
from egrc_jax.data import chat
from egrc_jax.rewards import RewardConfig, compute_rewards
from egrc_jax.sharding import batch_sharding, gather_rows, process_rows, to_host
from egrc_jax.train import (
  OptimConfig,
  init_state_sharded,
  lr_schedule,
  make_logprobs_pass,
  make_optimizer,
  make_train_step,
)
from egrc_jax.trainer import batch as batch_lib
from egrc_jax.trainer import diagnostics, setup
from egrc_jax.trainer.checkpoint import (
  Checkpointer,
  CheckpointError,
  check_model_shape,
  check_writable,
  json_model_config,
  latest_complete_step,
  read_meta,
  restore_params,
)
from egrc_jax.trainer.metrics import RUN_FINISHED, MetricsWriter, stage_begins
from egrc_jax.trainer.stages import EntropySwitch, Stage, stage_loss_config, stages_for

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
  """K consecutive non-finite updates (optim.max_bad_steps): the run stops, params intact."""


def _seed(*parts) -> int:
  digest = hashlib.sha256(json.dumps(parts).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Trainer:
  def __init__(self, config, workdir: str):
    # Everything is loaded and checked before anything is written: a refused run (a wrong
    # path, a checkpoint of another shape) leaves the workdir as it was, or absent.
    check_writable(workdir, create=False)
    self.config, self.workdir = config, workdir
    c = config
    self.mesh = setup.mesh_from_config(c)
    self.tokenizer = setup.load_tokenizer(c)
    self.model_cfg, self.model = setup.load_policy(c, self.mesh)
    setup.check_tokenizer(self.tokenizer, self.model_cfg)
    self.graphdef = nnx.graphdef(self.model)
    self.loss_cfg = setup.loss_config(c)
    self.stages = stages_for(c)
    # Each stage's loss (its own KL weight, `<section>.kl_coef`); the reference model is
    # kept, and its logprobs computed, only for stages whose loss has a KL term.
    self.stage_loss = {s.name: stage_loss_config(self.loss_cfg, s) for s in self.stages}
    self.use_ref = any(lc.kl_kind is not None for lc in self.stage_loss.values())
    # The frozen reference: the run's starting params (a copy: the policy's are donated).
    self.ref_params = (
      jax.tree.map(jnp.copy, nnx.state(self.model, nnx.Param)) if self.use_ref else None
    )
    rows = c.data.prompts_per_step * c.rollout.num_samples
    self.micro_batches = rows // (c.optim.micro_batch_rows or rows)
    # One jitted logprob pass serves the reference (KL) and the recomputed old logprobs.
    self._logp_fn = make_logprobs_pass(
      self.graphdef, self.loss_cfg.vocab_chunk, self.micro_batches, self.mesh
    )
    mode = c.rollout.recompute_old_logprobs
    filtered = c.rollout.top_p < 1.0 or c.rollout.top_k > 0
    self.recompute_old = mode == "always" or (mode == "auto" and filtered)
    self.train_data = setup.train_prompts(c, self.tokenizer)
    self.eval_data = setup.eval_prompts(c, self.tokenizer)
    self.connector_ids = diagnostics.connector_token_ids(self.tokenizer, c.log.connectors)
    self._check_existing_run()
    check_writable(workdir)
    self.ckpt = Checkpointer(workdir, c.checkpoint.keep)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json(indent=1))
    total = sum(s.steps for s in self.stages)
    self.writer = MetricsWriter(workdir, total, c.log.tensorboard)
    self.grader = setup.make_grader(c, self.tokenizer)
    self._stop = self._sigterm = False

  def _check_existing_run(self) -> None:
    """A workdir that holds checkpoints resumes only the same stage layout and model shape."""
    latest = latest_complete_step(self.workdir)
    if latest is None:
      return
    ckpts = os.path.join(self.workdir, "checkpoints")
    meta = read_meta(os.path.join(ckpts, str(latest)))
    names = [s.name for s in self.stages]
    if meta.get("stage_names") != names:
      raise CheckpointError(
        f"the checkpoint in {self.workdir} belongs to a run with stages "
        f"{meta.get('stage_names')}, not {names}; use a fresh --workdir"
      )
    check_model_shape(
      meta.get("model_config", {}), self.model_cfg, f"checkpoint step {latest} in {ckpts}"
    )

  # -- helpers ------------------------------------------------------------------------
  def sampling_config(self, temperature: float, top_p: float | None = None):
    c = self.config
    return sampler.SamplingConfig(
      temperature=temperature,
      top_p=c.rollout.top_p if top_p is None else top_p,
      top_k=c.rollout.top_k,
      max_new_tokens=c.rollout.max_new_tokens,
      stop_token_ids=chat.stop_ids(self.tokenizer, self.model_cfg),
      pad_id=chat.pad_id(self.tokenizer),
      prompt_buckets=tuple(c.rollout.prompt_buckets),
    )

  def _optim_config(self, stage: Stage) -> OptimConfig:
    o = self.config.optim
    return OptimConfig(
      lr=o.lr,
      warmup_steps=o.warmup_steps,
      total_steps=stage.steps,
      min_lr_ratio=o.min_lr_ratio,
      weight_decay=o.weight_decay,
      b1=o.b1,
      b2=o.b2,
      clip_norm=o.clip_norm,
    )

  def _lr(self, stage: Stage, step: int) -> float:
    return lr_schedule(self._optim_config(stage))(step)

  def _on_sigterm(self, signum, frame):
    log.warning("SIGTERM received: finishing this step, saving a checkpoint, exiting")
    self._stop = self._sigterm = True

  # -- one RL step --------------------------------------------------------------------
  def rl_step(self, stage: Stage, state, train_step, global_step: int, stage_step: int):
    c = self.config
    G, L = c.rollout.num_samples, c.rollout.max_new_tokens
    t0 = time.time()
    examples = self.train_data.next_batch()
    prompts = [e["prompt_ids"] for e in examples]
    golds = [e["gold"] for e in examples]
    scfg = self.sampling_config(stage.temperature)
    rollout = sampler.generate(
      self.model, prompts, scfg, num_samples=G, seed=_seed(c.seed, global_step), mesh=self.mesh
    )
    rollout = to_host(rollout)
    t1 = time.time()
    correct = self._grade(rollout, [g for g in golds for _ in range(G)])
    t2 = time.time()
    P = len(prompts)
    lengths_PG = np.asarray(rollout.lengths_B).reshape(P, G)
    trunc_PG = np.asarray(rollout.truncated_B).reshape(P, G)
    rcfg = RewardConfig(name=stage.reward, max_len=L, **stage.kwargs())
    rewards = compute_rewards(rcfg, correct.reshape(P, G), lengths_PG, trunc_PG)
    adv_PG, keep_PG = batch_lib.advantages(stage, rewards)
    loss_cfg = self.stage_loss[stage.name]
    batch = batch_lib.make_batch(
      rollout,
      adv_PG,
      keep_PG,
      loss_cfg,
      excluded_in_denominator=stage.excluded_in_denominator,
    )
    if self.mesh is not None:
      batch = jax.device_put(batch, batch_sharding(self.mesh))
    temperature = jnp.float32(stage.temperature)
    ref_time = old_time = 0.0
    if loss_cfg.kl_kind is not None:
      tr = time.time()
      ref = self._logp_fn(self.ref_params, batch, temperature)
      batch = batch.replace(ref_logp_BC=jax.block_until_ready(ref))
      ref_time = time.time() - tr
    if self.recompute_old:
      tr = time.time()
      old = self._logp_fn(state.params, batch, temperature)
      batch = batch.replace(old_logp_BC=jax.block_until_ready(old))
      old_time = time.time() - tr
    t3 = time.time()
    # The schedule is sized in RL steps: every PPO epoch of one step uses the same lr.
    lr = self._lr(stage, stage_step)
    state, m = train_step(state, batch, temperature, jnp.float32(lr))
    nnx.update(self.model, state.params)  # the donated arrays are gone: point at the new ones
    m = to_host(m)
    t4 = time.time()
    metrics = {k: float(v) for k, v in m.items()}
    metrics.update(rewards.metrics())
    metrics.update(
      diagnostics.rollout_metrics(rollout, correct, self.connector_ids, self.loss_cfg.rho)
    )
    metrics.update(
      {
        "stage": stage.name,
        "optim/lr": lr,
        "temperature": stage.temperature,
        "advantage/mean": float(adv_PG.mean()),
        "advantage/kept_share": float(keep_PG.mean()),
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

  def _grade(self, rollout, golds: list[str]) -> np.ndarray:
    """Each process grades its own rows; every process gets all verdicts."""
    rows = process_rows(len(golds))
    texts = sampler.decode_texts(jax.tree.map(lambda x: x[rows], rollout), self.tokenizer)
    local = np.asarray(self.grader.grade(texts, golds[rows]), bool)
    return gather_rows(local)

  # -- evaluation ---------------------------------------------------------------------
  def evaluate(self, params, tag: str) -> dict:
    c = self.config
    if self.eval_data is None or c.eval.num_prompts <= 0:
      return {}
    nnx.update(self.model, params)
    examples = self.eval_data.all()[: c.eval.num_prompts]
    n = c.eval.num_samples
    scfg = self.sampling_config(c.eval.temperature, top_p=c.eval.top_p)
    rollout = to_host(
      sampler.generate(
        self.model,
        [e["prompt_ids"] for e in examples],
        scfg,
        num_samples=n,
        seed=_seed(c.seed, "eval"),
        mesh=self.mesh,
      )
    )
    correct = self._grade(rollout, [e["gold"] for e in examples for _ in range(n)])
    lengths = np.asarray(rollout.lengths_B)
    out = {
      f"eval/{tag}/accuracy": float(correct.mean()),
      f"eval/{tag}/length": float(lengths.mean()),
      f"eval/{tag}/truncated": float(np.asarray(rollout.truncated_B).mean()),
    }
    return out

  # -- the run ------------------------------------------------------------------------
  def _meta(self, global_step, stage_index, stage_step, switch, extra=None) -> dict:
    return {
      "global_step": global_step,
      "stage_index": stage_index,
      "stage_step": stage_step,
      "stage_names": [s.name for s in self.stages],
      "data_state": self.train_data.get_state(),
      "switch_state": switch.state() if switch else None,
      "model_config": json_model_config(self.model_cfg),
      "switch_steps": list(self.switch_steps),
      **(extra or {}),
    }

  def run(self) -> dict:
    c = self.config
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    try:
      return self._run()
    finally:
      signal.signal(signal.SIGTERM, previous)
      self.grader.close()
      self.ckpt.close()
      self.writer.close()
      del c

  def _run(self) -> dict:
    c = self.config
    global_step, stage_index, stage_step = 0, 0, 0
    self.switch_steps: list[int] = []
    switch_state = None
    restored_state = None
    latest = self.ckpt.latest_step()
    if latest is not None:
      meta = self.ckpt.restore_meta(latest)  # its layout and shape: _check_existing_run
      global_step, stage_index, stage_step = (
        meta["global_step"],
        meta["stage_index"],
        meta["stage_step"],
      )
      self.switch_steps = list(meta.get("switch_steps", []))
      switch_state = meta.get("switch_state")
      self.train_data.set_state(meta["data_state"])
      restored_state = latest
      if stage_index >= len(self.stages):
        return self._finished_before(latest, meta)
      self.writer.event(global_step, "resumed", checkpoint=latest, stage_index=stage_index)

    self._start_step = global_step
    results = {"switch_steps": self.switch_steps}
    bad_steps = 0
    # One optimizer for every stage, and one compiled train step per distinct stage loss
    # (lr is a step argument, so stages that differ only in their schedule share one).
    tx = make_optimizer(self._optim_config(self.stages[0]))
    train_steps = {}  # one compiled step per distinct stage loss (most arms: one)
    while stage_index < len(self.stages):
      stage = self.stages[stage_index]
      # Every stage starts with fresh optimizer state from the current params.
      state, state_sh = init_state_sharded(self.model, tx, self.mesh)
      if restored_state is not None:
        state, _ = self.ckpt.restore(restored_state, state, self.model_cfg)
        nnx.update(self.model, state.params)  # the sampler reads the model's params
        restored_state = None
        if stage_step == 0:  # saved at a stage boundary: fresh optimizer for the new stage
          state, state_sh = init_state_sharded(self.model, tx, self.mesh)
      loss_cfg = self.stage_loss[stage.name]
      if loss_cfg not in train_steps:
        train_steps[loss_cfg] = make_train_step(
          self.graphdef,
          tx,
          loss_cfg,
          micro_batches=self.micro_batches,
          ppo_epochs=c.optim.ppo_epochs,
          remat=c.optim.remat,
          mesh=self.mesh,
          state_sharding=state_sh,
        )
      switch = None
      if (
        stage.name == "compress"
        and stage_index < len(self.stages) - 1
        and (c.switch.mode == "entropy")
      ):
        switch = EntropySwitch.from_state(
          c.switch.window, c.switch.min_drop, c.switch.min_steps, switch_state
        )
      if stage_step == 0:
        self.writer.event(
          global_step,
          stage_begins(stage.name),
          temperature=stage.temperature,
          reward=stage.reward,
          advantage=stage.advantage,
        )
      end_stage = stage_step >= stage.steps
      while not end_stage:
        state, metrics = self.rl_step(stage, state, train_steps[loss_cfg], global_step, stage_step)
        global_step += 1
        stage_step += 1
        if not metrics["finite"]:
          bad_steps += 1
          self.writer.event(
            global_step, "non-finite loss or gradient: update skipped", consecutive=bad_steps
          )
          if bad_steps >= c.optim.max_bad_steps:
            raise NonFiniteError(
              f"{bad_steps} consecutive non-finite updates (last at step {global_step}); params "
              "were left untouched. Lower optim.lr or check the rewards; the last checkpoint "
              "is intact"
            )
        else:
          bad_steps = 0
        end_stage = stage_step >= stage.steps
        if switch is not None and switch.update(metrics["entropy/mean"]) and not end_stage:
          end_stage = True
          self.switch_steps.append(global_step)
          self.writer.event(
            global_step, "entropy stopped descending: switching stage", stage_step=stage_step
          )
        if c.eval.every and global_step % c.eval.every == 0:
          metrics.update(self.evaluate(state.params, "periodic"))
        self.writer.write(global_step, metrics)
        if c.run_steps and global_step - self._start_step >= c.run_steps:
          self._stop = True
        if end_stage:
          break  # the stage-end checkpoint below also serves a stop request
        if self._stop or (c.checkpoint.every and global_step % c.checkpoint.every == 0):
          self.ckpt.save(
            global_step, state, self._meta(global_step, stage_index, stage_step, switch)
          )
          if self._stop:
            return self._stopped_early(global_step)
      # Stage end: evaluate, then checkpoint as the start of the next stage.
      if stage_index < len(self.stages) - 1 and global_step not in self.switch_steps:
        self.switch_steps.append(global_step)
      ev = self.evaluate(state.params, stage.name)
      if ev:
        self.writer.write(global_step, {**ev, "stage": stage.name})
      results[f"stage_{stage_index}_{stage.name}"] = {"end_step": global_step, **ev}
      stage_index, stage_step = stage_index + 1, 0
      if stage_index == len(self.stages):
        results["global_step"] = global_step
      # The last save also records the run's results (a re-run of a finished run reports
      # them and exports the final params from this checkpoint).
      extra = {"results": results} if stage_index == len(self.stages) else None
      self.ckpt.save(global_step, state, self._meta(global_step, stage_index, 0, None, extra))
      nnx.update(self.model, state.params)
      if self._stop and stage_index < len(self.stages):
        return self._stopped_early(global_step)
    self.writer.event(global_step, RUN_FINISHED, switch_steps=self.switch_steps)
    return results

  def _stopped_early(self, global_step: int) -> dict:
    """A stop before the end, checkpointed: by `run_steps` or by SIGTERM (preemption)."""
    reason = "sigterm" if self._sigterm else "run_steps"
    self.writer.event(global_step, f"stopping early ({reason}): checkpoint saved; re-run to resume")
    return {"stopped_early": reason, "global_step": global_step}

  def _finished_before(self, step: int, meta: dict) -> dict:
    """The workdir's run had finished before this call: load its final params into the model
    (what the export writes) and report its results, training nothing."""
    _, final = restore_params(self.ckpt.step_dir(step), self.mesh)
    nnx.update(self.model, nnx.state(final, nnx.Param))
    self.writer.event(step, "run had already finished: nothing to train")
    results = dict(meta.get("results") or {"global_step": step})
    return {**results, "already_finished": True}
