"""Rollouts: a jitted prefill, then one jitted `lax.while_loop` of decode steps.

Shape letters: P prompts, G samples per prompt, B = P * G rows (prompt-major: row p*G + g),
Tp padded prompt length (a bucket), C completion budget, S = Tp + C cache slots, V vocab.

Flow of `generate_state`:
  1. host: left-pad the P prompts to the smallest bucket Tp that holds the longest one;
  2. `prefill` (jit): one forward over [P, Tp] (self-attention over the prompt through the
     model's attention_impl, no [Tp, S] scores) that fills a KVCache of S slots; keeps the
     last position's logits [P, V]; repeats the cache G times (one prefill per prompt);
     then, on a mesh, the params are copied once into the sampling layout
     (`sampling_params`: bf16, no FSDP), so that no decode step all-gathers weights;
  3. `decode_loop` (jit, cache donated): draws token 0 for each of the B rows from the
     repeated prefill logits, then while t < C and some row is live: feeds each row's last
     token at slot Tp + t - 1, draws token t. No host sync inside the loop.
Row b's PRNG key is fold_in(fold_in(key(seed), prompt_id[b // G]), b % G), and step t uses
fold_in(row key, t): a row's samples depend only on (seed, prompt id, sample index), never on
the other rows of the batch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from egrc_jax.model import KVCache, Transformer, positions_from_mask
from egrc_jax.sampler.config import SamplingConfig
from egrc_jax.sampler.rollout import Rollout
from egrc_jax.sampler.sampling import sample_step
from egrc_jax.sharding import to_sampling_layout

# How many times each jitted function was traced (a trace is a compile): tests assert that
# the decode loop compiles once per shape bucket.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def trace_counts() -> dict[str, int]:
  return dict(TRACE_COUNTS)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "cache_size"))
def prefill(graphdef, state, tokens_PT, mask_PT, *, num_samples: int, cache_size: int):
  """Cached forward over the padded prompts. Returns (last logits [P, V] float32, KVCache
  with B = P * G rows of S = cache_size slots, index Tp).

  The forward runs over a Tp-slot cache, which is then padded to S: prefill attends over
  the prompt only, and every cache size (the continuous loop's Tp, the lock-step's Tp + C)
  gets the same bits."""
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  Pn, Tp = tokens_PT.shape
  cache = KVCache.zeros(model.cfg, Pn, Tp).constrain()
  hidden_PTD, cache = model.prefill(
    tokens_PT, positions_from_mask(mask_PT), mask_PT, cache, return_hidden=True
  )
  # Only the last position feeds the first draw: project just that one (saves a
  # [P, Tp, D] x [D, V] matmul).
  last_PV = model.logits(hidden_PTD[:, -1:])[:, 0]
  pad = lambda x, axis: jnp.pad(
    x, [(0, cache_size - Tp if a == axis else 0) for a in range(x.ndim)]
  )
  cache = cache.replace(
    k=tuple(pad(k, 3) for k in cache.k),
    v=tuple(pad(v, 2) for v in cache.v),
    valid_BS=pad(cache.valid_BS, 1),
  )
  cache = cache.repeat(num_samples).constrain()
  return last_PV, cache


def _row_keys(seed, prompt_ids_B, sample_ids_B):
  base = jax.random.key(seed)
  return jax.vmap(lambda p, g: jax.random.fold_in(jax.random.fold_in(base, p), g))(
    prompt_ids_B, sample_ids_B
  )


def _is_stop(tokens_B, stop_ids: tuple[int, ...]):
  if not stop_ids:
    return jnp.zeros(tokens_B.shape, bool)
  return jnp.any(tokens_B[:, None] == jnp.asarray(stop_ids, jnp.int32)[None], axis=-1)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "cfg", "num_samples"), donate_argnames=("cache",)
)
def decode_loop(
  graphdef, state, cache, last_PV, prompt_len_B, prompt_ids_B, seed, *, cfg, num_samples
):
  """Draw C tokens for each of the B rows. Returns (buffers [B, C]: tokens, mask and the
  `StepStats` fields; lengths [B]; truncated [B]; the final cache)."""
  TRACE_COUNTS["decode_loop"] += 1
  model = nnx.merge(graphdef, state)
  B, C = prompt_len_B.shape[0], cfg.max_new_tokens
  rows_B = jnp.arange(B, dtype=jnp.int32)
  keys_B = _row_keys(seed, prompt_ids_B, rows_B % num_samples)
  step_keys = lambda t: jax.vmap(lambda k: jax.random.fold_in(k, t))(keys_B)

  logits_BV = jnp.repeat(last_PV, num_samples, axis=0)
  draw = sample_step(logits_BV, step_keys(0), cfg)
  tok_B = draw.tokens
  bufs = {
    "tokens": jnp.full((B, C), cfg.pad_id, jnp.int32).at[:, 0].set(tok_B),
    "mask": jnp.zeros((B, C), bool).at[:, 0].set(True),
    **{k: jnp.zeros((B, C), jnp.float32).at[:, 0].set(v) for k, v in draw.stats._asdict().items()},
  }
  done_B = _is_stop(tok_B, cfg.stop_token_ids)

  def cond(carry):
    t, _, _, done_B, _ = carry
    return (t < C) & ~jnp.all(done_B)

  def body(carry):
    t, cache, tok_B, done_B, bufs = carry
    # Token t-1 sits at position len + t - 1 and cache slot Tp + t - 1 (= cache.index).
    pos_B1 = (prompt_len_B + t - 1)[:, None]
    logits_B1V, cache = model.decode(tok_B[:, None], pos_B1, jnp.ones((B, 1), bool), cache)
    draw = sample_step(logits_B1V[:, 0], step_keys(t), cfg)
    live_B = ~done_B
    new_B = jnp.where(live_B, draw.tokens, cfg.pad_id)
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, t))
    bufs = {
      "tokens": put(bufs["tokens"], new_B),
      "mask": put(bufs["mask"], live_B),
      **{k: put(bufs[k], jnp.where(live_B, v, 0.0)) for k, v in draw.stats._asdict().items()},
    }
    done_B = done_B | (live_B & _is_stop(new_B, cfg.stop_token_ids))
    return t + 1, cache, new_B, done_B, bufs

  init = (jnp.ones((), jnp.int32), cache, tok_B, done_B, bufs)
  _, cache, _, done_B, bufs = jax.lax.while_loop(cond, body, init)
  lengths_B = jnp.sum(bufs["mask"], axis=-1, dtype=jnp.int32)
  # A row that stopped has its stop token as its last generated token.
  last_B = jnp.take_along_axis(bufs["tokens"], jnp.maximum(lengths_B - 1, 0)[:, None], 1)[:, 0]
  truncated_B = ~(done_B & _is_stop(last_B, cfg.stop_token_ids))
  return bufs, lengths_B, truncated_B, cache


def prepare_prompts(prompts: Sequence[Sequence[int]], cfg: SamplingConfig, vocab_size: int):
  """Validate and left-pad host token lists. Returns (tokens [P, Tp] int32, mask [P, Tp]
  bool, lengths [P] int32) as numpy arrays."""
  if len(prompts) == 0:
    raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths == 0).any():
    raise ValueError(
      f"prompt(s) {np.flatnonzero(lengths == 0).tolist()} are empty; every "
      "prompt needs at least one token (e.g. BOS)"
    )
  Tp = cfg.bucket(int(lengths.max()))
  tokens = np.full((len(prompts), Tp), cfg.pad_id, np.int32)
  mask = np.zeros((len(prompts), Tp), bool)
  for i, p in enumerate(prompts):
    ids = np.asarray(p, np.int64)
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(
        f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): "
        f"min {ids.min()}, max {ids.max()}"
      )
    tokens[i, Tp - len(ids) :] = ids
    mask[i, Tp - len(ids) :] = True
  return tokens, mask, lengths


def check_config(cfg: SamplingConfig, vocab_size: int, max_positions: int, longest: int):
  bad = [t for t in cfg.stop_token_ids if t >= vocab_size]
  if bad:
    raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
  if cfg.pad_id >= vocab_size:
    raise ValueError(f"pad_id={cfg.pad_id} is outside the vocabulary [0, {vocab_size})")
  if longest + cfg.max_new_tokens > max_positions:
    raise ValueError(
      f"the longest prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
      f"the model's max_position_embeddings ({max_positions}); lower max_new_tokens or "
      "shorten the prompt"
    )


def rows_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Rows over data x fsdp when they divide evenly, replicated otherwise."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  spec = P(("data", "fsdp"), *([None] * (len(shape) - 1))) if shape[0] % n == 0 else P()
  return NamedSharding(mesh, spec)


def _put(x: np.ndarray, mesh: Mesh | None):
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, rows_sharding(x.shape, mesh))


LAYOUTS = ("sampling", "training")


def sampling_params(state: nnx.State, model_cfg, mesh: Mesh | None, layout: str = "sampling"):
  """The params the decode loop reads. layout="sampling" (default): one copy per rollout
  without FSDP, cast to the compute dtype (`sharding.to_sampling_layout`), so the decode
  loop never all-gathers weights; "training": the learner's arrays as they are (each
  decode step then gathers the FSDP-split model). Without a mesh: the state itself."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}")
  if mesh is None or layout == "training":
    return state
  return to_sampling_layout(state, mesh, model_cfg.jnp_dtype)


def generate_state(
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
  """`generate` over a split model (graphdef, state): the trainer passes its live policy
  state. On a mesh the decode loop reads a copy of the params made once, after the
  prefill, in the sampling layout (`sampling_params`; layout="training" reads the learner's
  FSDP layout directly).
  prompt_ids: one integer per prompt folded into its PRNG keys (default: the prompt's
  position in `prompts`); give stable ids (e.g. dataset indices) to make a prompt's samples
  independent of where it sits in the batch. cfg.loop picks the decode loop: "lockstep"
  (here) or "continuous" (`continuous.generate_continuous_state`), with the same output."""
  if cfg.loop == "continuous":
    # Imported here: continuous.py builds on this module's prefill and helpers.
    from egrc_jax.sampler.continuous import generate_continuous_state

    return generate_continuous_state(
      graphdef, state, prompts, cfg, num_samples, seed, mesh, prompt_ids, layout=layout
    )
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1 (G samples per prompt)")
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}")
  model_cfg = nnx.merge(graphdef, state).cfg
  tokens_PT, mask_PT, lengths_P = prepare_prompts(prompts, cfg, model_cfg.vocab_size)
  check_config(cfg, model_cfg.vocab_size, model_cfg.max_position_embeddings, int(lengths_P.max()))
  ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids)
  if ids.shape != (len(prompts),):
    raise ValueError(f"prompt_ids has shape {ids.shape}; give one id per prompt")
  G, (Pn, Tp) = num_samples, tokens_PT.shape
  rep = lambda x: np.repeat(x, G, axis=0)

  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    last_PV, cache = prefill(
      graphdef,
      state,
      _put(tokens_PT, mesh),
      _put(mask_PT, mesh),
      num_samples=G,
      cache_size=Tp + cfg.max_new_tokens,
    )
    # After the prefill, not before: one forward gathers each layer once either way, and
    # the prefill peaks lower on the FSDP arrays than on the copy (libtpu's compiler, v4-32:
    # 20.7 vs 30.5 GiB per chip for 1.5B, 33.0 vs 36.5 for 7B; docs/memory_plan.md).
    decode_state = sampling_params(state, model_cfg, mesh, layout)
    bufs, lengths_B, truncated_B, _ = decode_loop(
      graphdef,
      decode_state,
      cache,
      last_PV,
      _put(rep(lengths_P), mesh),
      _put(rep(ids).astype(np.int32), mesh),
      jnp.asarray(seed, jnp.uint32),
      cfg=cfg,
      num_samples=G,
    )
  return Rollout(
    prompt_tokens_BTp=_put(rep(tokens_PT), mesh),
    prompt_mask_BTp=_put(rep(mask_PT), mesh),
    completion_tokens_BC=bufs["tokens"],
    completion_mask_BC=bufs["mask"],
    lengths_B=lengths_B,
    truncated_B=truncated_B,
    logprobs_BC=bufs["logprob"],
    policy_logprobs_BC=bufs["policy_logprob"],
    entropy_BC=bufs["entropy"],
    tempered_logprobs_BC=bufs["tempered_logprob"],
    tempered_entropy_BC=bufs["tempered_entropy"],
    prompt_index_B=_put(np.arange(Pn * G, dtype=np.int32) // G, mesh),
    num_samples=G,
  )


def generate(
  model: Transformer,
  prompts: Sequence[Sequence[int]],
  cfg: SamplingConfig,
  num_samples: int = 1,
  seed: int = 0,
  mesh: Mesh | None = None,
  prompt_ids: Sequence[int] | None = None,
  layout: str = "sampling",
) -> Rollout:
  """G = num_samples completions for each prompt (host token lists); see `generate_state`."""
  graphdef, state = nnx.split(model)
  return generate_state(
    graphdef, state, prompts, cfg, num_samples, seed, mesh, prompt_ids, layout=layout
  )
