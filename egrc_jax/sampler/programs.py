"""The rollout loops' jitted programs over abstract shapes, for ahead-of-time compilation
(e.g. for a TPU topology from a CPU host) and the compiler's memory and cost figures.

Shape letters: P prompts, G samples per prompt, B rows or slots, Tp prompt bucket, C
completion budget, S = Tp + C, V vocab.

    progs = continuous_programs(graphdef, abstract_state, cfg, num_prompts=P, num_samples=G,
                                prompt_len=Tp, mesh=mesh, platform="tpu")
    with jax.set_mesh(mesh):
      compiled = {name: p.lower().compile() for name, p in progs.items()}

`abstract_state` holds `jax.ShapeDtypeStruct`s (with shardings on a mesh), e.g. from
`abstract_state(model_cfg, mesh)`. Programs: "prefill", "decode" (the whole loop) and
"decode_step" (one step of the loop's body, for bytes per step); `lockstep_programs` gives
the same three for the lock-step loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Ps

from egrc_jax.model import KVCache, ModelConfig, Transformer
from egrc_jax.model.logical import logical_to_spec
from egrc_jax.sampler.config import SamplingConfig
from egrc_jax.sampler.continuous import continuous_decode, slot_logits
from egrc_jax.sampler.generate import decode_loop, prefill
from egrc_jax.sampler.layouts import make_layout, prompt_shards, resolve_layout
from egrc_jax.sampler.paged_kv import PagedSlotKV
from egrc_jax.sampler.sampling import sample_step
from egrc_jax.sampler.slot_kv import SlotStep, prompt_names


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function with its abstract arguments: `lower()` = fn.lower(*args, **kwargs)."""

  fn: Any
  args: tuple
  kwargs: dict

  def lower(self):
    return self.fn.lower(*self.args, **self.kwargs)


def abstract_state(model_cfg: ModelConfig, mesh: Mesh | None = None) -> tuple:
  """(graphdef, state of ShapeDtypeStructs) of a model, sharded by the logical rules."""
  from egrc_jax.sharding import variable_spec

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))

  def leaf(v):
    sharding = None if mesh is None else NamedSharding(mesh, variable_spec(v, mesh))
    return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))

  return graphdef, jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _spec(mesh, names, shape, dtype):
  sharding = None if mesh is None else NamedSharding(mesh, logical_to_spec(names, shape, mesh))
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _rows(mesh, shape, dtype):
  """Rows over data x fsdp when they divide evenly, replicated otherwise (`generate._put`)."""
  if mesh is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  spec = Ps(("data", "fsdp"), *([None] * (len(shape) - 1))) if shape[0] % n == 0 else Ps()
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _cache(mesh, model_cfg: ModelConfig, rows: int, size: int) -> KVCache:
  K, H, dt = model_cfg.num_kv_heads, model_cfg.head_dim, model_cfg.jnp_dtype
  L = model_cfg.num_layers
  return KVCache(
    k=tuple(_spec(mesh, KVCache.K_NAMES, (rows, K, H, size), dt) for _ in range(L)),
    v=tuple(_spec(mesh, KVCache.V_NAMES, (rows, K, size, H), dt) for _ in range(L)),
    valid_BS=_rows(mesh, (rows, size), jnp.bool_),
    index=jax.ShapeDtypeStruct((), jnp.int32),
  )


def _prompt_args(mesh, P: int, Tp: int, V: int):
  return (_rows(mesh, (P, Tp), jnp.int32), _rows(mesh, (P, Tp), jnp.bool_))


def continuous_programs(
  graphdef,
  state,
  cfg: SamplingConfig,
  *,
  num_prompts: int,
  num_samples: int,
  prompt_len: int,
  mesh: Mesh | None = None,
  platform: str = "tpu",
) -> dict[str, Program]:
  """The continuous loop's programs: prefill (G = 1, S = Tp), decode (`continuous_decode`
  over B = min(num_slots, P*G) slots, the KV layout `resolve_layout(cfg, platform)`), and
  decode_step (one body step: the slots' forward and draw)."""
  model_cfg = _model_cfg(graphdef, state)
  P, G, Tp, V = num_prompts, num_samples, prompt_len, model_cfg.vocab_size
  B = min(cfg.num_slots, P * G)
  cfg = cfg.replace(loop="continuous", num_slots=B)
  layout = resolve_layout(cfg, platform)
  i32 = lambda *shape: _rows(mesh, shape, jnp.int32)
  decode_args = (
    graphdef,
    state,
    _cache(mesh, model_cfg, P, Tp),
    _rows(mesh, (P, V), jnp.float32),
    i32(P),
    i32(P),
    jax.ShapeDtypeStruct((), jnp.uint32),
  )
  kw = dict(cfg=cfg, num_samples=G, num_slots=B, layout=layout, platform=platform)

  @functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("kv",))
  def decode_step(graphdef, state, kv, prompt_len_P, tok_B, prompt_B, t_B, keys_B):
    model = nnx.merge(graphdef, state)
    step = SlotStep(prompt_B, t_B, prompt_len_P[prompt_B], t_B > 0)
    logits_BV, kv = slot_logits(model, kv, tok_B, step)
    return sample_step(logits_BV, keys_B, cfg), kv

  def make(prompt_cache, prompt_len_P):
    return make_layout(prompt_cache, prompt_len_P, cfg, B, layout, platform, prompt_shards(P, B))

  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    kv = jax.eval_shape(make, decode_args[2], i32(P))
  kv = _layout_specs(kv, mesh)
  keys = jax.ShapeDtypeStruct((B,), jax.random.key(0).dtype)
  step_args = (graphdef, state, kv, i32(P), i32(B), i32(B), i32(B), keys)
  return {
    "prefill": Program(
      prefill, (graphdef, state, *_prompt_args(mesh, P, Tp, V)), dict(num_samples=1, cache_size=Tp)
    ),
    "decode": Program(continuous_decode, decode_args, kw),
    "decode_step": Program(decode_step, step_args, {}),
  }


def lockstep_programs(
  graphdef,
  state,
  cfg: SamplingConfig,
  *,
  num_prompts: int,
  num_samples: int,
  prompt_len: int,
  mesh: Mesh | None = None,
) -> dict[str, Program]:
  """The lock-step loop's programs: prefill (G-fold repeat, S = Tp + C), decode
  (`decode_loop` over B = P*G rows) and decode_step (one `model.decode` step and draw)."""
  model_cfg = _model_cfg(graphdef, state)
  P, G, Tp, V = num_prompts, num_samples, prompt_len, model_cfg.vocab_size
  B, S = P * G, prompt_len + cfg.max_new_tokens
  cfg = cfg.replace(loop="lockstep")
  i32 = lambda *shape: _rows(mesh, shape, jnp.int32)
  cache = _cache(mesh, model_cfg, B, S)
  decode_args = (
    graphdef,
    state,
    cache,
    _rows(mesh, (P, V), jnp.float32),
    i32(B),
    i32(B),
    jax.ShapeDtypeStruct((), jnp.uint32),
  )

  @functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
  def decode_step(graphdef, state, cache, tok_B, pos_B, keys_B):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tok_B[:, None], pos_B[:, None], jnp.ones((B, 1), bool), cache)
    return sample_step(logits[:, 0], keys_B, cfg), cache

  keys = jax.ShapeDtypeStruct((B,), jax.random.key(0).dtype)
  return {
    "prefill": Program(
      prefill,
      (graphdef, state, *_prompt_args(mesh, P, Tp, V)),
      dict(num_samples=G, cache_size=S),
    ),
    "decode": Program(decode_loop, decode_args, dict(cfg=cfg, num_samples=G)),
    "decode_step": Program(decode_step, (graphdef, state, cache, i32(B), i32(B), keys), {}),
  }


def _layout_specs(kv, mesh):
  """The abstract KV layout with the shardings its constructor constrains it to."""
  if mesh is None:  # (eval_shape drops shardings; they follow from each field's names)
    return kv
  spec = lambda names: lambda x: _spec(mesh, names, x.shape, x.dtype)
  if isinstance(kv, PagedSlotKV):
    return kv.replace(
      k_pages=tuple(map(spec(PagedSlotKV.POOL_NAMES), kv.k_pages)),
      v_pages=tuple(map(spec(PagedSlotKV.POOL_NAMES), kv.v_pages)),
      table_BR=spec(("batch", None))(kv.table_BR),
    )
  k_names, v_names = prompt_names(kv.shards)
  return kv.replace(
    prompt_k=tuple(map(spec(k_names), kv.prompt_k)),
    prompt_v=tuple(map(spec(v_names), kv.prompt_v)),
    prompt_valid_PT=spec((k_names[0], None))(kv.prompt_valid_PT),
    k=tuple(map(spec(KVCache.K_NAMES), kv.k)),
    v=tuple(map(spec(KVCache.V_NAMES), kv.v)),
  )


def _model_cfg(graphdef, state) -> ModelConfig:
  return nnx.merge(graphdef, state).cfg
