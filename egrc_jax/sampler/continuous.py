"""Continuous batching: a fixed number of decode slots, each refilled on device with the next
pending (prompt, sample) pair as soon as its row stops.

Shape letters: P prompts, G samples per prompt, N = P * G pairs (prompt-major: pair p*G + g,
the lock-step row order), B slots (B_s = min(num_slots, N)), Tp padded prompt length, C
completion budget, V vocab.

Flow of `continuous_rollout`:
  1. host: pad and bucket the prompts as the lock-step sampler does;
  2. `prefill` (the lock-step one, G = 1, S = Tp): one cached forward over [P, Tp]; the
     cache is the prompt cache that the G samples of a group read (no G-fold copy);
  3. `continuous_decode` (jit): token 0 of every pair is drawn from its prompt's prefill
     logits (in chunks of prompts); pairs whose token 0 is a stop (or C = 1) are complete.
     The others queue in pair order. One `lax.while_loop` then steps all B slots: each
     feeds its last token, writes its key/value into its own completion KV, attends over
     its prompt's cache + its completion (`slot_kv`), draws token t and writes it to the
     output buffers at [pair, t]. A slot whose row stopped (stop token, or t = C - 1)
     takes the next queued pair in the same iteration: no host round trip.
Randomness is the lock-step design: pair (p, g) draws token t with
fold_in(fold_in(fold_in(key(seed), prompt_id[p]), g), t) and the same `sample_step`, so its
tokens do not depend on which slot, or next to which pairs, it ran.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from egrc_jax.model import KVCache
from egrc_jax.model.logical import shard
from egrc_jax.model.transformer import rope_inv_freq
from egrc_jax.sampler.config import SamplingConfig
from egrc_jax.sampler.generate import (
  TRACE_COUNTS,
  _is_stop,
  _put,
  _row_keys,
  check_config,
  prefill,
  prepare_prompts,
  sampling_params,
)
from egrc_jax.sampler.layouts import kv_layout_bytes, make_layout, prompt_shards, resolve_layout
from egrc_jax.sampler.paged_kv import PagedSlotKV, _batch_shards
from egrc_jax.sampler.rollout import Rollout
from egrc_jax.sampler.sampling import sample_step
from egrc_jax.sampler.slot_kv import DenseSlotKV, SlotStep, SplitSlotKV

_FIRST_DRAW_ROWS = 512  # rows of one chunk of token-0 draws ([rows, V] float32 at a time)


def first_draws(last_PV, prompt_ids_P, seed, cfg: SamplingConfig, num_samples: int):
  """Token 0 of every pair: `sample_step` on its prompt's prefill logits with the key
  fold_in(row key, 0). Returns a `Draw` of [N] arrays."""
  Pn, V = last_PV.shape
  G = num_samples
  c = max(d for d in range(1, Pn + 1) if Pn % d == 0 and d * G <= max(_FIRST_DRAW_ROWS, G))

  def chunk(args):
    last_cV, ids_c = args
    ids_B = jnp.repeat(ids_c, G)
    keys_B = _row_keys(seed, ids_B, jnp.tile(jnp.arange(G, dtype=jnp.int32), c))
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_B)
    return sample_step(jnp.repeat(last_cV, G, axis=0), keys_B, cfg)

  outs = jax.lax.map(chunk, (last_PV.reshape(Pn // c, c, V), prompt_ids_P.reshape(Pn // c, c)))
  return jax.tree.map(lambda x: x.reshape(Pn * G), outs)


def slot_logits(model, kv, tok_B, step: SlotStep):
  """One decode step of every slot: token t_b - 1 at position len_p + t_b - 1 through the
  model's own pieces (embed, each block's norms / projections / MLP, final norm, logits).
  Returns (float32 logits [B, V], the updated KV layout)."""
  inv_freq = rope_inv_freq(model.cfg)
  pos_B1 = (step.prompt_len_B + step.t_B - 1)[:, None]
  x_B1D = model.embed(tok_B[:, None])
  for i, layer in enumerate(model.layers):
    # As `Block.__call__` does it, with the slot layout's write and attention.
    q, k, v = layer.attn.project(layer.attn_norm(x_B1D), pos_B1, inv_freq)
    out_B1D, kv = kv.attend(i, layer.attn, q, k, v, step)
    x_B1D = x_B1D + out_B1D
    x_B1D = x_B1D + layer.mlp(layer.mlp_norm(x_B1D))
    x_B1D = shard(x_B1D, ("batch", "length", "embed"))
  return model.logits(model.final_norm(x_B1D))[:, 0], kv


@flax.struct.dataclass
class Slots:
  """The loop carry of B slots: the KV layout, which slots took a pair on the last step
  (their prompt is copied in first), each slot's pair (N = none), step t_b and
  last token; each prompt shard's queue head [Dq]; the output buffers [N, C]; counters
  (int32 scalars): loop steps, active slot-steps, slot-steps (slots x steps, summed over
  the shrink levels)."""

  kv: DenseSlotKV | SplitSlotKV | PagedSlotKV
  fresh_B: jax.Array
  pair_B: jax.Array
  t_B: jax.Array
  tok_B: jax.Array
  head: jax.Array
  bufs: dict
  steps: jax.Array
  busy: jax.Array
  slot_steps: jax.Array


def shrink_plan(num_slots: int, shards: int, levels: int) -> tuple[int, ...]:
  """Slot counts of the loop's levels: B, B/2, ... while each of the D shards keeps a
  whole, even number of slots, at most `levels` halvings."""
  sizes = [num_slots]
  while len(sizes) <= levels and (sizes[-1] // shards) % 2 == 0:
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def _shrink(slots: Slots, size: int, shards: int, N: int) -> Slots:
  """Move each shard's active slots (at most half of its slots, in order) into `size`
  slots; the rest of the new slots are idle. Slots never leave their shard."""
  B = slots.pair_B.shape[0]
  per, keep = B // shards, size // shards
  active_DS = (slots.pair_B < N).reshape(shards, per)
  idx_DK = jax.vmap(lambda a: jnp.nonzero(a, size=keep, fill_value=0)[0])(active_DS)
  live_DK = jnp.arange(keep)[None, :] < jnp.sum(active_DS, 1, keepdims=True)

  def take(x_B):
    x_DS = x_B.reshape(shards, per, *x_B.shape[1:])
    idx = idx_DK.reshape(shards, keep, *([1] * (x_B.ndim - 1)))
    return jnp.take_along_axis(x_DS, idx, axis=1).reshape(size, *x_B.shape[1:])

  live_B = live_DK.reshape(size)
  return slots.replace(
    kv=slots.kv.take(take),
    fresh_B=live_B & take(slots.fresh_B),
    pair_B=jnp.where(live_B, take(slots.pair_B), N),
    t_B=take(slots.t_B),
    tok_B=take(slots.tok_B),
  )


def _put_pairs(buf_NC, x_B, *, pair_B, t_B, shards: int):
  """buf[pair_b, t_b] = x_b for the slots holding a pair (pair N: dropped). With shards > 1
  a slot's pair is on its own shard and the scatter runs per shard (a batched scatter the
  partitioner keeps local)."""
  N, C = buf_NC.shape
  if shards == 1:
    return buf_NC.at[pair_B, t_B].set(x_B, mode="drop", unique_indices=True)
  M, S = N // shards, pair_B.shape[0] // shards
  local_DS = jnp.where(pair_B < N, pair_B % M, M).reshape(shards, S)  # M: dropped
  put = lambda buf_MC, i_S, t_S, x_S: buf_MC.at[i_S, t_S].set(x_S, mode="drop")
  buf_DMC = jax.vmap(put)(
    buf_NC.reshape(shards, M, C), local_DS, t_B.reshape(shards, S), x_B.reshape(shards, S)
  )
  return buf_DMC.reshape(N, C)


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "cfg", "num_samples", "num_slots", "layout", "platform"),
)
def continuous_decode(
  graphdef,
  state,
  prompt_cache: KVCache,
  last_PV,
  prompt_len_P,
  prompt_ids_P,
  seed,
  *,
  cfg: SamplingConfig,
  num_samples: int,
  num_slots: int,
  layout: str,
  platform: str,
):
  """Draw up to C tokens for each of the N pairs over B = num_slots slots. Returns (bufs:
  tokens, mask, logprobs, policy logprobs, entropy, each [N, C]; lengths [N]; truncated
  [N]; stats: steps, active_slot_steps, slot_steps as int32 scalars).

  Levels: once no pair is pending and every shard has at most half of its slots active,
  the live slots move into half as many (`shrink_plan`, up to cfg.shrink_levels times),
  so the drain at the end runs on fewer rows. Each level is one more loop in the program;
  none needs the host."""
  TRACE_COUNTS["continuous_decode"] += 1
  model = nnx.merge(graphdef, state)
  G, C, B = num_samples, cfg.max_new_tokens, num_slots
  Pn = last_PV.shape[0]
  N = Pn * G
  D = _batch_shards()
  D = D if B % D == 0 else 1  # slots that do not split over the shards are replicated
  draw0 = first_draws(last_PV, prompt_ids_P, seed, cfg, G)
  tok0_N = draw0.tokens
  f32 = lambda x0: jnp.zeros((N, C), jnp.float32).at[:, 0].set(x0)
  bufs = {
    "tokens": jnp.full((N, C), cfg.pad_id, jnp.int32).at[:, 0].set(tok0_N),
    "mask": jnp.zeros((N, C), bool).at[:, 0].set(True),
    **{k: f32(v) for k, v in draw0.stats._asdict().items()},
  }
  # Pairs are split over the batch shards like rows; with Dq prompt shards each shard
  # writes only its own pairs' rows (`put`).
  bufs = {k: shard(x, ("batch", None)) for k, x in bufs.items()}
  # The queues: pairs that need a slot, in pair order, one queue per prompt shard (the
  # pairs of its P / Dq prompts; slots take pairs of their own shard only, so each slot's
  # prompt cache is local to it), padded with N (= no pair).
  Dq = prompt_shards(Pn, B)
  M = N // Dq
  need_DM = (~_is_stop(tok0_N, cfg.stop_token_ids) & (C > 1)).reshape(Dq, M)
  queue_DM = jax.vmap(lambda n: jnp.nonzero(n, size=M, fill_value=M)[0])(need_DM)
  queue_DM = jnp.where(queue_DM < M, queue_DM + M * jnp.arange(Dq)[:, None], N).astype(jnp.int32)
  count_D = jnp.sum(need_DM, axis=1, dtype=jnp.int32)

  def queue_at(head_D, rank_B):
    """The pair `rank` places behind each shard's head, for each slot (N: none left)."""
    i_DS = head_D[:, None] + rank_B.reshape(Dq, -1)
    pair_DS = jnp.take_along_axis(queue_DM, jnp.minimum(i_DS, M - 1), axis=1)
    return jnp.where(i_DS < count_D[:, None], pair_DS, N).reshape(-1)

  def step_of(pair_B, t_B):
    active_B = pair_B < N
    prompt_B = jnp.where(active_B, pair_B // G, 0)
    return SlotStep(prompt_B, t_B, prompt_len_P[prompt_B], active_B)

  def body(c: Slots) -> Slots:
    step = step_of(c.pair_B, c.t_B)
    # Slots that took a pair last step get its prompt first: done here, before the layers
    # read the cache, XLA updates it in place (at the end of the body it copied layers).
    kv = c.kv.refill(c.fresh_B, step)
    logits_BV, kv = slot_logits(model, kv, c.tok_B, step)
    keys_B = _row_keys(seed, prompt_ids_P[step.prompt_B], c.pair_B % G)
    keys_B = jax.vmap(jax.random.fold_in)(keys_B, c.t_B)
    draw = sample_step(logits_BV, keys_B, cfg)
    new_B = draw.tokens
    # Idle slots hold pair N: their writes fall outside [N, C] and are dropped.
    put = functools.partial(_put_pairs, pair_B=c.pair_B, t_B=c.t_B, shards=Dq)
    values = {"tokens": new_B, "mask": step.active_B, **draw.stats._asdict()}
    bufs = {k: put(c.bufs[k], x) for k, x in values.items()}
    stopped_B = _is_stop(new_B, cfg.stop_token_ids) | (c.t_B + 1 >= C)
    free_B = ~step.active_B | stopped_B
    free_DS = free_B.reshape(Dq, -1)
    rank_B = (jnp.cumsum(free_DS, axis=1, dtype=jnp.int32) - 1).reshape(-1)
    take_pair_B = queue_at(c.head, rank_B)
    pair_B = jnp.where(free_B, take_pair_B, c.pair_B)
    t_B = jnp.where(free_B, 1, c.t_B + 1)
    tok_B = jnp.where(free_B, tok0_N[jnp.minimum(take_pair_B, N - 1)], new_B)
    return Slots(
      kv=kv,
      fresh_B=free_B & (take_pair_B < N),
      pair_B=pair_B,
      t_B=t_B,
      tok_B=tok_B,
      head=jnp.minimum(c.head + jnp.sum(free_DS, axis=1, dtype=jnp.int32), count_D),
      bufs=bufs,
      steps=c.steps + 1,
      busy=c.busy + jnp.sum(step.active_B, dtype=jnp.int32),
      slot_steps=c.slot_steps + pair_B.shape[0],
    )

  zero_D = jnp.zeros((Dq,), jnp.int32)
  pair_B = queue_at(zero_D, jnp.tile(jnp.arange(B // Dq, dtype=jnp.int32), Dq))
  t_B = jnp.ones((B,), jnp.int32)
  kv = make_layout(prompt_cache, prompt_len_P, cfg, B, layout, platform, Dq)
  zero = jnp.zeros((), jnp.int32)
  slots = Slots(
    kv=kv,
    fresh_B=pair_B < N,
    pair_B=pair_B,
    t_B=t_B,
    tok_B=tok0_N[jnp.minimum(pair_B, N - 1)],
    head=jnp.minimum(zero_D + B // Dq, count_D),
    bufs=bufs,
    steps=zero,
    busy=zero,
    slot_steps=zero,
  )
  sizes = shrink_plan(B, D, cfg.shrink_levels)
  for level, size in enumerate(sizes):
    if level:
      slots = _shrink(slots, size, D, N)
    last = level == len(sizes) - 1

    def cond(c: Slots, last=last):
      active_DS = (c.pair_B < N).reshape(D, -1)
      go = jnp.any(active_DS)
      if last:
        return go
      # Stay at this size while a pair is pending or some shard is over half full.
      half = active_DS.shape[1] // 2
      return go & (jnp.any(c.head < count_D) | jnp.any(jnp.sum(active_DS, 1) > half))

    slots = jax.lax.while_loop(cond, body, slots)
  bufs = slots.bufs
  lengths_N = jnp.sum(bufs["mask"], axis=-1, dtype=jnp.int32)
  last_N = jnp.take_along_axis(bufs["tokens"], (lengths_N - 1)[:, None], 1)[:, 0]
  truncated_N = ~_is_stop(last_N, cfg.stop_token_ids)
  stats = {"steps": slots.steps, "active_slot_steps": slots.busy, "slot_steps": slots.slot_steps}
  return bufs, lengths_N, truncated_N, stats


def continuous_rollout(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  prompts: Sequence[Sequence[int]],
  cfg: SamplingConfig,
  num_samples: int = 1,
  seed: int = 0,
  mesh: Mesh | None = None,
  prompt_ids: Sequence[int] | None = None,
  params_layout: str = "sampling",
) -> tuple[Rollout, dict]:
  """`generate_state` with the continuous loop. Returns (the Rollout, exactly as the
  lock-step loop lays it out, and host stats: steps, active_slot_steps, num_slots, pairs,
  slot_utilisation = active slot-steps / (slots x steps), kv_bytes {prompt, completion}).
  params_layout: as `generate_state`'s layout (the decode loop reads the sampling copy)."""
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1 (G samples per prompt)")
  model_cfg = nnx.merge(graphdef, state).cfg
  tokens_PT, mask_PT, lengths_P = prepare_prompts(prompts, cfg, model_cfg.vocab_size)
  check_config(cfg, model_cfg.vocab_size, model_cfg.max_position_embeddings, int(lengths_P.max()))
  ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids)
  if ids.shape != (len(prompts),):
    raise ValueError(f"prompt_ids has shape {ids.shape}; give one id per prompt")
  G, (Pn, Tp) = num_samples, tokens_PT.shape
  B = min(cfg.num_slots, Pn * G)
  platform = jax.default_backend()
  layout = resolve_layout(cfg, platform)
  rep = lambda x: np.repeat(x, G, axis=0)
  cfg = cfg.replace(num_slots=B)  # one compile per effective slot count
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    last_PV, cache = prefill(
      graphdef, state, _put(tokens_PT, mesh), _put(mask_PT, mesh), num_samples=1, cache_size=Tp
    )
    decode_state = sampling_params(state, model_cfg, mesh, params_layout)
    bufs, lengths_N, truncated_N, stats = continuous_decode(
      graphdef,
      decode_state,
      cache,
      last_PV,
      jnp.asarray(lengths_P),
      jnp.asarray(ids.astype(np.int32)),
      jnp.asarray(seed, jnp.uint32),
      cfg=cfg,
      num_samples=G,
      num_slots=B,
      layout=layout,
      platform=platform,
    )
  rollout = Rollout(
    prompt_tokens_BTp=_put(rep(tokens_PT), mesh),
    prompt_mask_BTp=_put(rep(mask_PT), mesh),
    completion_tokens_BC=bufs["tokens"],
    completion_mask_BC=bufs["mask"],
    lengths_B=lengths_N,
    truncated_B=truncated_N,
    logprobs_BC=bufs["logprob"],
    policy_logprobs_BC=bufs["policy_logprob"],
    entropy_BC=bufs["entropy"],
    tempered_logprobs_BC=bufs["tempered_logprob"],
    tempered_entropy_BC=bufs["tempered_entropy"],
    prompt_index_B=_put(np.arange(Pn * G, dtype=np.int32) // G, mesh),
    num_samples=G,
  )
  host = {k: int(v) for k, v in stats.items()} | {"num_slots": B, "pairs": Pn * G}
  host["slot_utilisation"] = host["active_slot_steps"] / max(host["slot_steps"], 1)
  D = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  copies = 1 if Pn % D == 0 and B % D == 0 else D  # `prompt_shards`: own prompts or all
  host["kv_bytes"] = kv_layout_bytes(model_cfg, cfg, Pn, Tp, B, layout, copies)
  host["layout"] = layout
  return rollout, host


def generate_continuous_state(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  prompts: Sequence[Sequence[int]],
  cfg: SamplingConfig,
  num_samples: int = 1,
  seed: int = 0,
  mesh: Mesh | None = None,
  prompt_ids: Sequence[int] | None = None,
  layout: str = "sampling",
) -> Rollout:
  """`continuous_rollout` without the stats: the drop-in for `generate_state`."""
  return continuous_rollout(
    graphdef, state, prompts, cfg, num_samples, seed, mesh, prompt_ids, params_layout=layout
  )[0]
