"""The learner's state and its jitted, sharded train step.

Shape letters: B learner rows, S slots per row, C loss positions per row, M micro-batches,
b rows per micro-batch (B = M b), D hidden, V vocab. A row holds one rollout sequence
(prompt, left padded, then completion: the padded layout, S = Tp + C, and the C loss
positions are slots Tp-1 .. S-2) or several packed end to end (the packed layout, segment
ids 1, 2, ... with positions restarting per sequence, C = S: every slot may predict a
completion token). `trainer/batch.py` builds either from a rollout.

One call of `train_step` runs `ppo_epochs` x M gradient micro-batches over a rollout batch
(lax.scan accumulates gradients, so peak activation memory is one micro-batch's) and one
optimizer update per epoch. A micro-batch without a completion token (the empty rows of a
packed batch, which `trainer/batch.py` gathers into the last micro-batches) is skipped
under `lax.cond`: it would add exact zeros. The batch's loss is sum_t w_t * l_t with
aggregation weights w_t computed for the whole batch beforehand (`egrc_jax.losses`), which
makes the accumulated gradient identical to the full-batch gradient for every aggregation
mode and either layout. A non-finite loss or gradient leaves params and optimizer state untouched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from egrc_jax import losses
from egrc_jax.model import Transformer


@flax.struct.dataclass
class TrainState:
  params: nnx.State  # policy parameters (nnx.Param leaves)
  opt_state: optax.OptState
  step: jax.Array  # optimizer updates applied in the current stage


@flax.struct.dataclass
class Batch:
  """One rollout batch laid out for the learner (module docstring): B rows of S slots, and
  the loss inputs at each row's C loss positions (slots head_start .. head_start + C - 1),
  zero where a position predicts no completion token."""

  tokens_BS: jax.Array  # int32
  segments_BS: jax.Array  # int32: 0 on padding, 1, 2, ... one id per sequence of the row
  positions_BS: jax.Array  # int32: the token's position in its own sequence
  targets_BC: jax.Array  # the next token of the sequence at each loss position
  completion_BC: jax.Array  # bool: the loss position predicts a completion token
  old_logp_BC: jax.Array  # behaviour-policy logprobs: the PPO ratio's denominator
  sampler_logp_BC: jax.Array  # the sampler's log p_T (stage temperature, no filter)
  ref_logp_BC: jax.Array  # reference logprobs (zeros when KL is off)
  adv_BC: jax.Array  # advantages broadcast over tokens
  weight_BC: jax.Array  # aggregation weights: batch loss = sum(weight * token loss)
  select_BC: jax.Array  # entropy-selection factor on the PPO term (1 when off)
  head_start: int = flax.struct.field(pytree_node=False, default=0)  # slot of loss position 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW and its per-stage schedule (warmup, then cosine over the stage's steps)."""

  lr: float
  warmup_steps: int
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float = 1.0


def lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
  """lr_t = lr (t+1)/W for t < W (linear warmup that never applies lr 0), then cosine from
  lr to lr * min_lr_ratio over the remaining total_steps - W steps (t counts RL steps)."""

  def lr_at(step: int) -> float:
    warmup = max(cfg.warmup_steps, 0)
    if step < warmup:
      return cfg.lr * (step + 1) / warmup
    progress = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio

  return lr_at


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW without its learning rate: clip by global norm, Adam moments, decoupled weight
  decay. The train step multiplies by -lr itself, with lr given per call from
  `lr_schedule`; so one compiled step serves every stage, whatever its schedule."""
  return optax.chain(
    optax.clip_by_global_norm(cfg.clip_norm),
    optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2),
    optax.add_decayed_weights(cfg.weight_decay),
  )


def completion_hidden(model: Transformer, batch: Batch, remat: bool = False) -> jax.Array:
  """Final hidden states at the loss positions [B, C, D]."""
  hidden_BSD = model(
    batch.tokens_BS,
    batch.positions_BS,
    segment_ids_BT=batch.segments_BS,
    return_hidden=True,
    remat=remat,
  )
  C = batch.targets_BC.shape[1]
  return hidden_BSD[:, batch.head_start : batch.head_start + C]


def completion_logprobs(
  params, graphdef, batch: Batch, temperature, vocab_chunk: int, remat: bool = False
):
  """(logprobs, entropy) [B, C] of the targets at `temperature` (vocab-chunked)."""
  model = nnx.merge(graphdef, params)
  return losses.token_logprobs_and_entropy(
    completion_hidden(model, batch, remat),
    model.lm_head_weight(),
    batch.targets_BC,
    temperature=temperature,
    chunk_size=vocab_chunk,
  )


def _micro_loss(params, graphdef, mb: Batch, temperature, loss_cfg: losses.LossConfig, remat):
  logp, entropy = completion_logprobs(
    params, graphdef, mb, temperature, loss_cfg.vocab_chunk, remat
  )
  loss, wsum = losses.batch_loss(
    logp, entropy, mb.old_logp_BC, mb.ref_logp_BC, mb.adv_BC, mb.weight_BC, mb.select_BC, loss_cfg
  )
  return loss, (wsum, jax.lax.stop_gradient(logp))


def micro_batch_count(batch: Batch, micro_batch_rows: int) -> int:
  """M for a batch of B rows: B / micro_batch_rows (0: one micro-batch of every row)."""
  B = batch.tokens_BS.shape[0]
  b = micro_batch_rows or B
  if B % b:
    raise ValueError(f"{B} learner rows do not split into micro-batches of {b} rows")
  return B // b


def _has_tokens(mb: Batch) -> jax.Array:
  """Scalar: the micro-batch has a completion token (else its loss, gradient and logprobs are
  exact zeros, and the step skips its computation)."""
  return jnp.any(mb.completion_BC)


def computed_micro_batches(batch: Batch, micro_batch_rows: int) -> int:
  """How many of the batch's micro-batches the train step computes (those with a completion
  token; the others are skipped), counted on the host."""
  mbs = _split(batch.completion_BC, micro_batch_count(batch, micro_batch_rows))
  return int(np.asarray(mbs).reshape(mbs.shape[0], -1).any(axis=1).sum())


def _unless_empty(fn, mb: Batch):
  """fn(mb), or zeros of its output's shapes (without computing it) when `mb` has no
  completion token."""
  zeros = lambda mb: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, mb))
  return jax.lax.cond(_has_tokens(mb), fn, zeros, mb)


def _split(batch: Batch, m: int) -> Batch:
  """[B, ...] -> [m, B / m, ...], micro-batch j holding rows j, j + m, j + 2m, ...: strided,
  so that each micro-batch takes rows from every data shard (rows are sharded in contiguous
  blocks; a contiguous micro-batch would sit on a few devices and leave the others idle).
  Exact for any split: the aggregation weights are computed for the whole batch."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)


def _unsplit(x_MbC: jax.Array) -> jax.Array:
  """The inverse of `_split` for one [m, B / m, ...] array."""
  return x_MbC.swapaxes(0, 1).reshape(-1, *x_MbC.shape[2:])


def sampler_learner_metrics(learner_logp_BC, sampler_logp_BC, mask_BC) -> dict[str, jax.Array]:
  """How far the learner's recomputed logprobs are from the sampler's, on-policy (before any
  update) over every completion token: max and mean |delta log p| and the Pearson r of the
  token probabilities. Pure numerics drift (kernels, precision, cache vs full forward) when
  both are log p_T at the same temperature."""
  m = mask_BC.astype(bool)
  d = jnp.where(m, jnp.abs(learner_logp_BC - sampler_logp_BC), 0.0)
  return {
    "sampler_learner/max_abs_logp_diff": jnp.max(d),
    "sampler_learner/mean_abs_logp_diff": jnp.sum(d) / jnp.maximum(jnp.sum(m), 1),
    "sampler_learner/prob_pearson": losses.pearson_corr(
      jnp.exp(sampler_logp_BC), jnp.exp(learner_logp_BC), m
    ),
  }


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  loss_cfg: losses.LossConfig,
  *,
  micro_batch_rows: int = 0,
  ppo_epochs: int = 1,
  mesh: Mesh | None = None,
  state_sharding=None,
  remat: bool = False,
) -> Callable[..., tuple[TrainState, dict]]:
  """A jitted `step(state, batch, temperature, lr) -> (state, metrics)`; state is donated.

  micro_batch_rows: rows per gradient micro-batch (0: the whole batch), the token budget of
  a micro-batch in units of S; the count follows from the batch's rows (a packed batch
  has the rollout's rows, its empty micro-batches skipped; without micro-batches it has
  fewer rows, in buckets: one compile per bucket). remat: recompute each block in the
  backward pass (activation memory of one block).
  """
  grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

  def one_update(state: TrainState, batch: Batch, temperature, lr):
    zeros = jax.tree.map(jnp.zeros_like, state.params)

    def body(carry, mb):
      def add(carry):
        g_acc, l_acc, s_acc = carry
        (loss, (wsum, logp)), g = grad_fn(state.params, graphdef, mb, temperature, loss_cfg, remat)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        s_acc = jax.tree.map(jnp.add, s_acc, wsum)
        return (g_acc, l_acc + loss, s_acc), logp

      # A micro-batch without a completion token would add exact zeros: the sums pass
      # through (inside the cond, so no gradient-sized zeros are materialised).
      logp = jax.eval_shape(add, carry)[1]
      keep = lambda carry: (carry, jnp.zeros(logp.shape, logp.dtype))
      return jax.lax.cond(_has_tokens(mb), add, keep, carry)

    init_stats = {k: jnp.zeros((), jnp.float32) for k in losses.TOKEN_STAT_NAMES}
    carry = (zeros, jnp.zeros((), jnp.float32), init_stats)
    M = micro_batch_count(batch, micro_batch_rows)
    (grads, loss, stats), logp_MbC = jax.lax.scan(body, carry, _split(batch, M))
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state),
      step=state.step + finite.astype(jnp.int32),
    )
    # Means under the loss's own weights (the tokens that get gradient, weighted as the loss
    # weighs them); NaN when no token has weight (e.g. stage 1 with no R > 0 row), not 0.
    wtot = jnp.sum(batch.weight_BC)
    safe = jnp.where(wtot > 0, wtot, 1.0)
    metrics = {
      f"loss_weighted/{k}": jnp.where(wtot > 0, v / safe, jnp.nan) for k, v in stats.items()
    }
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite)
    metrics.update(
      sampler_learner_metrics(_unsplit(logp_MbC), batch.sampler_logp_BC, batch.completion_BC)
    )
    return new_state, metrics

  def step(state: TrainState, batch: Batch, temperature, lr):
    first = None
    finite = jnp.bool_(True)
    for _ in range(ppo_epochs):
      state, metrics = one_update(state, batch, temperature, lr)
      first = metrics if first is None else first
      finite = finite & metrics["finite"]
    # The first epoch's statistics are the on-policy ones; `finite` covers every epoch.
    return state, {**first, "finite": finite, "grad_norm_last": metrics["grad_norm"]}

  if mesh is None:
    return jax.jit(step, donate_argnums=(0,))
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  jitted = jax.jit(
    step,
    in_shardings=(state_sharding, rows, None, None),
    out_shardings=(state_sharding, None),
    donate_argnums=(0,),
  )
  return _UnderMesh(jitted, mesh)


class _UnderMesh:
  """A jitted function called (so traced) and lowered under `jax.set_mesh(mesh)`: the
  model's logical sharding constraints on activations act only inside a mesh context."""

  def __init__(self, fn, mesh: Mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args)


def init_state_sharded(params: nnx.State, tx, mesh: Mesh | None):
  """(TrainState, its shardings) with fresh optimizer state for `params` (an nnx.State of
  Params, already on the mesh): optimizer moments laid out like their params, the
  optimizer's scalars (counts) and the step replicated."""
  if mesh is None:
    return TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32)), None
  rep = NamedSharding(mesh, P())
  params_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, sh: sh,
    jax.eval_shape(tx.init, params),
    params_sh,
    transform_non_params=lambda _: rep,
  )
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  shardings = TrainState(params=params_sh, opt_state=opt_sh, step=rep)
  step = jax.device_put(jnp.zeros((), jnp.int32), rep)
  return TrainState(params, opt_state, step), shardings


def logprobs_pass(
  graphdef, params, batch: Batch, temperature, vocab_chunk: int, micro_batch_rows: int = 0
):
  """Logprobs [B, C] of the targets under `params` (the frozen reference, or the policy
  before its update when old logprobs are recomputed), in the learner's micro-batches
  (`lax.map`: the activation memory of one micro-batch, as in the train step)."""
  M = micro_batch_count(batch, micro_batch_rows)
  if M == 1:
    return completion_logprobs(params, graphdef, batch, temperature, vocab_chunk)[0]
  one = lambda mb: completion_logprobs(params, graphdef, mb, temperature, vocab_chunk)[0]
  return _unsplit(jax.lax.map(lambda mb: _unless_empty(one, mb), _split(batch, M)))


def make_logprobs_pass(graphdef, vocab_chunk: int, micro_batch_rows: int, mesh: Mesh | None):
  """A jitted `(params, batch, temperature) -> logprobs [B, C]` (see `logprobs_pass`),
  traced under the mesh when there is one."""

  def run(params, batch, temperature):
    return logprobs_pass(graphdef, params, batch, temperature, vocab_chunk, micro_batch_rows)

  if mesh is None:
    return jax.jit(run)
  # Rows out as they came in (over data x fsdp), so the result drops into the batch.
  return _UnderMesh(jax.jit(run, out_shardings=NamedSharding(mesh, P(("data", "fsdp")))), mesh)
