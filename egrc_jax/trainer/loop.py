"""The RL loop: resume, run the plan's stages back to back, checkpoint.

`train(run)` runs config.arm's stages (the second from the first's final params, with a fresh
optimizer), checkpoints every `checkpoint.every` steps, at every stage end and on SIGTERM,
and resumes from the latest checkpoint of the workdir when re-run. It returns the run's
results (with its switch steps) and its final params. `Trainer(config, workdir).run()` is
the same with the run's parts prepared and closed around it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal

from flax import nnx

from egrc_jax.cli import UserError
from egrc_jax.trainer import setup
from egrc_jax.trainer.checkpoint import json_model_config, restore_params
from egrc_jax.trainer.metrics import RUN_FINISHED, stage_begins
from egrc_jax.trainer.setup import Run
from egrc_jax.trainer.step import evaluate_policy, rl_step
from egrc_jax.trainer.switch import EntropySwitch

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
  """K consecutive non-finite updates (optim.max_bad_steps): the run stops, params intact."""


def seed_of(*parts) -> int:
  """A 31-bit seed from any JSON-able parts (the config seed, a step, a tag)."""
  digest = hashlib.sha256(json.dumps(parts).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Position:
  """Where a run is: what a checkpoint's meta records and a resume restores."""

  global_step: int = 0
  stage_index: int = 0
  stage_step: int = 0
  switch_steps: list[int] = dataclasses.field(default_factory=list)
  switch_state: dict | None = None  # the entropy switch's history, mid stage 1
  restore_step: int | None = None  # the checkpoint to load the params (and optimizer) from


def _meta(run: Run, pos: Position, extra: dict | None = None) -> dict:
  return {
    "global_step": pos.global_step,
    "stage_index": pos.stage_index,
    "stage_step": pos.stage_step,
    "stage_names": run.plan.stage_names,
    "data_state": run.train_data.get_state(),
    "switch_state": pos.switch_state,
    "model_config": json_model_config(run.model_cfg),
    "switch_steps": list(pos.switch_steps),
    **(extra or {}),
  }


def resume(run: Run) -> tuple[Position, dict | None]:
  """(position, meta of the checkpoint it came from) of the workdir; a fresh run without."""
  latest = run.ckpt.latest_step()
  if latest is None:
    return Position(), None
  meta = run.ckpt.restore_meta(latest)  # its layout and shape: setup.check_existing_run
  run.train_data.set_state(meta["data_state"])
  pos = Position(
    meta["global_step"],
    meta["stage_index"],
    meta["stage_step"],
    list(meta.get("switch_steps", [])),
    meta.get("switch_state"),
    latest,
  )
  return pos, meta


def _start_state(run: Run, pos: Position):
  """The stage's TrainState: restored from the checkpoint when resuming, with a fresh
  optimizer when the checkpoint sits at a stage boundary."""
  state = run.programs.fresh_state(run.params)
  if pos.restore_step is not None:
    state, _ = run.ckpt.restore(pos.restore_step, state, run.model_cfg)
    pos.restore_step = None
    if pos.stage_step == 0:
      state = run.programs.fresh_state(state.params)
  return state


def _evaluate(run: Run, params) -> dict[str, float]:
  if run.eval_data is None:
    return {}
  seed = seed_of(run.config.seed, "eval")
  return evaluate_policy(
    run.eval, run.eval_data.all(), run.graphdef, params, run.grader, seed, run.mesh
  )


class _Stop:
  """Why the loop stops early: `run_steps` reached, or SIGTERM (a preemption notice)."""

  def __init__(self):
    self.reason: str | None = None

  def on_sigterm(self, signum, frame):
    log.warning("SIGTERM received: finishing this step, saving a checkpoint, exiting")
    self.reason = "sigterm"


def run_stage(run: Run, stage, state, pos: Position, stop: _Stop, start_step: int):
  """The RL steps of one stage from pos.stage_step on; returns (state, ended). The stage ends
  at its step count or at an entropy switch; stop.reason set means a checkpointed early
  stop (run_steps, SIGTERM)."""
  c = run.config
  switch = EntropySwitch.from_state(stage.switch, pos.switch_state) if stage.switch else None
  bad_steps = 0
  while pos.stage_step < stage.steps:
    lr = run.programs.lr(stage, pos.stage_step)
    state, metrics = rl_step(
      stage, state, run.train_data.next_batch(), lr, seed_of(c.seed, pos.global_step),
      graphdef=run.graphdef, grader=run.grader, ref_params=run.ref_params,
      programs=run.programs, num_samples=run.plan.data.num_samples, mesh=run.mesh,
      connector_ids=run.connector_ids,
    )  # fmt: skip
    pos.global_step += 1
    pos.stage_step += 1
    if not metrics["finite"]:
      bad_steps += 1
      run.writer.event(
        pos.global_step, "non-finite loss or gradient: update skipped", consecutive=bad_steps
      )
      if bad_steps >= run.plan.optim.max_bad_steps:
        raise NonFiniteError(
          f"{bad_steps} consecutive non-finite updates (last at step {pos.global_step}); params "
          "were left untouched. Lower optim.lr or check the rewards; the last checkpoint is "
          "intact"
        )
    else:
      bad_steps = 0
    ended = pos.stage_step >= stage.steps
    if switch is not None and switch.update(metrics["entropy/mean"]) and not ended:
      ended = True
      pos.switch_steps.append(pos.global_step)
      run.writer.event(
        pos.global_step, "entropy stopped descending: switching stage", stage_step=pos.stage_step
      )
    pos.switch_state = switch.state() if switch else None
    if run.eval.every and pos.global_step % run.eval.every == 0:
      metrics.update({f"eval/periodic/{k}": v for k, v in _evaluate(run, state.params).items()})
    run.writer.write(pos.global_step, metrics)
    if c.run_steps and pos.global_step - start_step >= c.run_steps and not stop.reason:
      stop.reason = "run_steps"
    if ended:
      return state, True  # the stage-end checkpoint also serves a stop request
    if stop.reason or (c.checkpoint.every and pos.global_step % c.checkpoint.every == 0):
      run.ckpt.save(pos.global_step, state, _meta(run, pos))
      if stop.reason:
        return state, False
  return state, True


def train(run: Run) -> tuple[dict, nnx.State]:
  """Run (or resume) the plan's stages; returns (results, final params)."""
  pos, meta = resume(run)
  stages = run.stages
  if pos.stage_index >= len(stages):  # the run had finished before this call
    _, final = restore_params(run.ckpt.step_dir(pos.restore_step), run.mesh)
    run.writer.event(pos.global_step, "run had already finished: nothing to train")
    results = dict(meta.get("results") or {"global_step": pos.global_step})
    return {**results, "already_finished": True}, nnx.state(final, nnx.Param)
  if meta is not None:
    run.writer.event(
      pos.global_step, "resumed", checkpoint=pos.restore_step, stage_index=pos.stage_index
    )
  results: dict = {"switch_steps": pos.switch_steps}
  stop, start_step = _Stop(), pos.global_step
  previous = signal.signal(signal.SIGTERM, stop.on_sigterm)
  try:
    state = None
    while pos.stage_index < len(stages):
      stage = stages[pos.stage_index]
      state = _start_state(run, pos) if state is None else run.programs.fresh_state(state.params)
      if pos.stage_step == 0:
        run.writer.event(
          pos.global_step, stage_begins(stage.name), temperature=stage.temperature,
          reward=stage.reward.name, advantage=stage.advantage.kind,
        )  # fmt: skip
      state, ended = run_stage(run, stage, state, pos, stop, start_step)
      if not ended:
        return _stopped_early(run, pos, stop), state.params
      # Stage end: evaluate, then checkpoint as the start of the next stage.
      last = pos.stage_index == len(stages) - 1
      if not last and pos.global_step not in pos.switch_steps:
        pos.switch_steps.append(pos.global_step)
      ev = {f"eval/{stage.name}/{k}": v for k, v in _evaluate(run, state.params).items()}
      if ev:
        run.writer.write(pos.global_step, {**ev, "stage": stage.name})
      results[f"stage_{pos.stage_index}_{stage.name}"] = {"end_step": pos.global_step, **ev}
      pos.stage_index, pos.stage_step, pos.switch_state = pos.stage_index + 1, 0, None
      if last:
        results["global_step"] = pos.global_step
      # The last save records the results too: a re-run of the finished run reports them
      # and exports the final params from this checkpoint.
      run.ckpt.save(pos.global_step, state, _meta(run, pos, {"results": results} if last else None))
      if stop.reason and not last:
        return _stopped_early(run, pos, stop), state.params
  finally:
    signal.signal(signal.SIGTERM, previous)
  run.writer.event(pos.global_step, RUN_FINISHED, switch_steps=pos.switch_steps)
  return results, state.params


def _stopped_early(run: Run, pos: Position, stop: _Stop) -> dict:
  run.writer.event(
    pos.global_step, f"stopping early ({stop.reason}): checkpoint saved; re-run to resume"
  )
  return {"stopped_early": stop.reason, "global_step": pos.global_step}


class Trainer:
  """`Trainer(config, workdir).run()`: prepare the run's parts (every check before anything
  is written), train, close. After `run`, `params` / `model` hold the final policy."""

  def __init__(self, config, workdir: str):
    self.ctx = setup.prepare(config, workdir)
    self.ctx.open()
    self.config, self.workdir = config, workdir
    self.params = self.ctx.params

  def run(self) -> dict:
    try:
      results, self.params = train(self.ctx)
      return results
    finally:
      self.ctx.close()

  @property
  def model(self):
    return nnx.merge(self.ctx.graphdef, self.params)

  @property
  def tokenizer(self):
    return self.ctx.tokenizer
