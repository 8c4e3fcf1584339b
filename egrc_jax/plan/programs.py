"""Every program a run executes, as (jitted function, abstract arguments) on a mesh.

    programs = run_programs(config, mesh)   # {name: Program}, in execution order
    programs["train"].lower()               # jax.stages.Lowered; .compile() for a TPU mesh

The builders call the project's real functions exactly as the trainer does
(`egrc_jax.trainer.loop.Trainer`): `sampler.generate_state`'s sampling-layout copy,
`prefill` and `decode_loop` under `jax.set_mesh`; `train.make_train_step` with the
`init_state_sharded` shardings; `jax.jit(train.reference_logprobs)` on the host batch; and
the evaluation's prefill and decode at eval.num_prompts x eval.num_samples rows. Arguments
are `jax.ShapeDtypeStruct`s carrying `NamedSharding`s (from `nnx.eval_shape` and the rules
tables), so nothing is allocated: a 7B model costs no memory here.

When the trainer's API changes, this is the one module to point at it.

Shape letters: P prompts, G samples per prompt, B = P G rows, Tp prompt bucket, C new
tokens, S = Tp + C, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from egrc_jax.model import KVCache, ModelConfig
from egrc_jax.model.logical import logical_to_spec
from egrc_jax.sampler import SamplingConfig, decode_loop, prefill
from egrc_jax.sampler import programs as sampler_programs_lib
from egrc_jax.sampler.generate import rows_sharding
from egrc_jax.sharding import (
  abstract_model,
  batch_sharding,
  sampling_dtype,
  sampling_layout_fn,
  sampling_shardings,
  state_shardings,
)
from egrc_jax.train import Batch, TrainState, make_logprobs_pass, make_optimizer, make_train_step
from egrc_jax.trainer.batch import bucket_rows
from egrc_jax.trainer.plan import build_plan
from egrc_jax.trainer.setup import preset_model_config

PROGRAMS = (
  "prefill",
  "reshard",
  "decode",
  "reference",
  "train",
  "train_padded",
  "eval_prefill",
  "eval_reshard",
  "eval_decode",
)
# The share of a packed learner batch's slots that real tokens fill, for the train step's
# shape (its rows are rounded up to a bucket; R1-Distill on MATH at L = 8192 fills ~30-40%).
PACKED_FILL = 0.5


@dataclasses.dataclass
class Program:
  """One compiled program of a run. `resident`: bytes per device the run holds outside this
  program's arguments while it runs (e.g. the optimizer state during a rollout)."""

  name: str
  fn: Callable  # a jax.jit-wrapped function
  args: Callable[[dict], tuple]  # compiled programs so far -> positional arguments
  kwargs: dict
  resident: dict[str, int]
  keys: tuple[str, ...]  # config keys that change its memory, most effective first
  trips: int = 1  # iterations of its main loop (XLA's cost analysis counts a body once)
  loop: str = ""  # "decode": report the collectives of its while body
  model_flops: float = 0.0  # per device, per loop trip (train: one micro-batch)
  # what the chip executes for them: with remat each block's forward runs twice (8/6)
  hardware_flops: float = 0.0
  real_tokens: float = 0.0  # train: the rollout's real tokens the step learns from
  param_sizes: frozenset[int] = frozenset()  # weight element counts (marks weight gathers)
  mesh: Mesh | None = None  # set: lowered under jax.set_mesh (the sampler is, the learner not)
  note: str = ""

  def lower(self, compiled: dict | None = None):
    """jax.stages.Lowered; `compiled` maps names to programs already compiled (the decode
    loop takes the prefill's output shardings from it)."""
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      return self.fn.lower(*self.args(compiled or {}), **self.kwargs)


def model_config(c) -> ModelConfig:
  """The run's model shapes, as `trainer.setup.load_policy` builds them for a preset (an
  hf_path checkpoint is not read: its config.json must match the preset's shapes)."""
  return preset_model_config(c)


def sds_tree(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves with the matching leaves of `shardings`."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return int(total)


def abstract_train_state(cfg: ModelConfig, tx, mesh: Mesh):
  """(graphdef, TrainState of ShapeDtypeStructs, its shardings): `train.init_state_sharded`
  without allocating -- params by the RULES table, moments like their params, the
  optimizer's counts and the step replicated."""
  graphdef, state = abstract_model(cfg)
  params_sh = state_shardings(state, mesh)
  params = sds_tree(state, params_sh)
  rep = NamedSharding(mesh, P())
  opt_abs = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(
    tx, lambda _, sh: sh, opt_abs, params_sh, transform_non_params=lambda _: rep
  )
  shardings = TrainState(params=params_sh, opt_state=opt_sh, step=rep)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  return graphdef, TrainState(params, sds_tree(opt_abs, opt_sh), step), shardings


def abstract_sampling_params(params, mesh: Mesh, compute_dtype):
  """The params in the sampling layout (`sharding.to_sampling_layout`'s output)."""
  shardings = sampling_shardings(params, mesh)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  sh = jax.tree.leaves(shardings)
  out = [
    jax.ShapeDtypeStruct(x.shape, sampling_dtype(p, x.dtype, compute_dtype), sharding=s)
    for (p, x), s in zip(flat, sh, strict=True)
  ]
  return jax.tree.unflatten(treedef, out), shardings


def abstract_batch(rows: int, S: int, C: int, head_start: int, sharding=None) -> Batch:
  """The learner's Batch [B, S] / [B, C] (`trainer.batch.make_batch`'s dtypes): padded
  (C = L loss positions from slot Tp - 1) or packed (C = S, head_start 0)."""
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  f32 = lambda: sds((rows, C), jnp.float32)
  return Batch(
    tokens_BS=sds((rows, S), jnp.int32),
    segments_BS=sds((rows, S), jnp.int32),
    positions_BS=sds((rows, S), jnp.int32),
    targets_BC=sds((rows, C), jnp.int32),
    completion_BC=sds((rows, C), jnp.bool_),
    old_logp_BC=f32(),
    sampler_logp_BC=f32(),
    ref_logp_BC=f32(),
    adv_BC=f32(),
    weight_BC=f32(),
    select_BC=f32(),
    head_start=head_start,
  )


def train_model_flops(cfg: ModelConfig, rows: int, seq: int, num_devices: int) -> float:
  """Model FLOPs of one learner micro-batch per device (PaLM appendix B): 6 N_mm per token
  for the forward and backward matmuls (N_mm: all weights but the embedding lookup), plus
  12 L N H S per token for the attention scores and values; remat's recompute not counted."""
  n_mm = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
  if cfg.tie_embeddings:
    n_mm += cfg.vocab_size * cfg.hidden_size  # the table is also the output projection
  tokens = rows * seq
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
  return (6 * n_mm + attn) * tokens / num_devices


def weight_sizes(params, mesh: Mesh, minimum: int = 2**16) -> frozenset[int]:
  """Element counts of every weight matrix, whole and as one sampling-layout shard (what
  an all-gather over fsdp of a training-layout weight produces). Arrays under `minimum`
  elements (norm scales, biases) are left out: activations of that size are common."""
  sizes = set()
  shardings = jax.tree.leaves(sampling_shardings(params, mesh))
  for x, s in zip(jax.tree.leaves(params), shardings, strict=True):
    for n in (math.prod(x.shape), math.prod(s.shard_shape(x.shape))):
      if n >= minimum:
        sizes.add(n)
  return frozenset(sizes)


def _cache_shardings(cfg: ModelConfig, rows: int, size: int, mesh: Mesh) -> KVCache:
  """KVCache of `rows` rows with the logical layout `KVCache.constrain` gives it."""
  k = jax.ShapeDtypeStruct((rows, cfg.num_kv_heads, cfg.head_dim, size), cfg.jnp_dtype)
  v = jax.ShapeDtypeStruct((rows, cfg.num_kv_heads, size, cfg.head_dim), cfg.jnp_dtype)
  named = lambda x, names: jax.ShapeDtypeStruct(
    x.shape, x.dtype, sharding=NamedSharding(mesh, logical_to_spec(names, x.shape, mesh))
  )
  valid = jax.ShapeDtypeStruct((rows, size), jnp.bool_)
  return KVCache(
    k=tuple(named(k, KVCache.K_NAMES) for _ in range(cfg.num_layers)),
    v=tuple(named(v, KVCache.V_NAMES) for _ in range(cfg.num_layers)),
    valid_BS=named(valid, ("batch", "cache_length")),
    index=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
  )


def _rows(shape, dtype, mesh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=rows_sharding(shape, mesh))


def _bind(sampling: SamplingConfig, cfg: ModelConfig) -> SamplingConfig:
  """A plan's sampling settings with stop tokens (those of a tokenizer, when the run has
  one, only change which token stops a row, not a program's shapes)."""
  stop = tuple(cfg.eos_token_ids) or (cfg.vocab_size - 1,)
  return sampling.replace(stop_token_ids=stop, pad_id=cfg.pad_token_id or 0)


def run_programs(c, mesh: Mesh, layout: str = "sampling") -> dict[str, Program]:
  """Every program of a run of config `c` on `mesh`, in the order a step runs them.

  layout: "sampling" (what `generate_state` does) or "training" (decode straight from the
  learner's FSDP arrays, the layout before the sampling copy existed; no reshard program).
  The rollout and the evaluation use the decode loop the config names (rollout.loop); the
  train step is compiled in the config's learner layout ("train") and in the other one.
  """
  cfg = model_config(c)
  plan = build_plan(c)
  stages, o = plan.stages, plan.optim
  tx = make_optimizer(o.adamw)
  graphdef, state_abs, state_sh = abstract_train_state(cfg, tx, mesh)
  params = state_abs.params
  samp_params, _ = abstract_sampling_params(params, mesh, cfg.jnp_dtype)
  losses = {s.loss: s for s in stages}
  use_ref = any(lc.kl_kind is not None for lc in losses)
  # the learner's logprobs pass also runs for the old logprobs (rollout.recompute_old_logprobs)
  use_pass = use_ref or any(s.recompute_old_logprobs for s in stages)
  G, Pn, C = plan.data.num_samples, plan.data.prompts_per_step, c.rollout.max_new_tokens
  B = Pn * G
  Tp = SamplingConfig(prompt_buckets=tuple(c.rollout.prompt_buckets)).bucket(
    c.data.max_prompt_tokens
  )
  S = Tp + C
  state_bytes = device_bytes(state_abs)
  opt_bytes = state_bytes - device_bytes(params)
  ref = {"reference params (KL on)": device_bytes(params)} if use_ref else {}
  seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=NamedSharding(mesh, P()))
  decode_params = samp_params if layout == "sampling" else params
  # prefill (and the training-layout decode) read the learner's params as arguments; the
  # sampling-layout decode reads the copy, beside the learner's whole state
  beside_params = {"optimizer state": opt_bytes, **ref}
  beside_copy = {"train state (params + optimizer)": state_bytes, **ref}
  progs: dict[str, Program] = {}

  def reshard(prefix, rows, cache_len, keys):
    if layout != "sampling":
      return
    # between prefill and decode, beside the prefill's KV cache
    cache_bytes = device_bytes(_cache_shardings(cfg, rows, cache_len, mesh))
    progs[prefix + "reshard"] = Program(
      prefix + "reshard",
      sampling_layout_fn(sampling_shardings(params, mesh), cfg.jnp_dtype),
      lambda _: (params,),
      {},
      {**beside_params, "KV cache (prefill output)": cache_bytes},
      ("mesh.tensor", *keys),
      mesh=mesh,
      note="params -> sampling layout (bf16, no fsdp), once per rollout",
    )

  def continuous(prefix: str, prompts: int, group: int, scfg: SamplingConfig, keys):
    sp = sampler_programs_lib.continuous_programs
    kw = dict(num_prompts=prompts, num_samples=group, prompt_len=Tp, mesh=mesh)
    pre = sp(graphdef, params, scfg, **kw)["prefill"]
    dec = sp(graphdef, decode_params, scfg, **kw)["decode"]
    slots = min(scfg.num_slots, prompts * group)
    progs[prefix + "prefill"] = Program(
      prefix + "prefill", pre.fn, lambda _: pre.args, pre.kwargs, beside_params, keys,
      mesh=mesh, note=f"{prompts} prompts x {Tp} tokens -> one prompt cache per group",
    )  # fmt: skip
    reshard(prefix, prompts, Tp, keys)
    progs[prefix + "decode"] = Program(
      prefix + "decode", dec.fn, lambda _: dec.args, dec.kwargs,
      beside_copy if layout == "sampling" else beside_params, ("rollout.num_slots", *keys),
      trips=-(-prompts * group // slots) * scfg.max_new_tokens, loop="decode",
      param_sizes=weight_sizes(params, mesh), mesh=mesh,
      note=f"continuous: {slots} slots for {prompts * group} (prompt, sample) pairs, "
      f"{scfg.kv_layout} KV; trips = the bound of every pair at the full budget",
    )  # fmt: skip

  def lockstep(prefix: str, prompts: int, group: int, scfg: SamplingConfig, keys):
    rows = prompts * group
    tokens = _rows((prompts, Tp), jnp.int32, mesh)
    mask = _rows((prompts, Tp), jnp.bool_, mesh)
    progs[prefix + "prefill"] = Program(
      prefix + "prefill",
      prefill,
      lambda _: (graphdef, params, tokens, mask),
      {"num_samples": group, "cache_size": Tp + scfg.max_new_tokens},
      beside_params,
      keys,
      mesh=mesh,
      note=f"{prompts} prompts x {Tp} tokens -> KV cache of {rows} rows x {S} slots",
    )
    reshard(prefix, rows, Tp + scfg.max_new_tokens, keys)

    def decode_args(compiled):
      pre = compiled.get(prefix + "prefill")
      if pre is not None:  # exactly what prefill hands over
        last, cache = sds_tree(
          jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pre.out_info),
          pre.output_shardings,
        )
      else:
        vocab = logical_to_spec(("batch", "vocab"), (prompts, cfg.vocab_size), mesh)
        last = jax.ShapeDtypeStruct(
          (prompts, cfg.vocab_size), jnp.float32, sharding=NamedSharding(mesh, vocab)
        )
        cache = _cache_shardings(cfg, rows, Tp + scfg.max_new_tokens, mesh)
      lens = _rows((rows,), jnp.int32, mesh)
      return (graphdef, decode_params, cache, last, lens, lens, seed)

    progs[prefix + "decode"] = Program(
      prefix + "decode",
      decode_loop,
      decode_args,
      {"cfg": scfg, "num_samples": group},
      beside_copy if layout == "sampling" else beside_params,
      keys,
      trips=scfg.max_new_tokens,
      loop="decode",
      param_sizes=weight_sizes(params, mesh),
      mesh=mesh,
      note=f"{rows} rows x {scfg.max_new_tokens} steps of one lax.while_loop",
    )

  def sampler_programs(prefix, prompts, group, scfg, keys):
    build = continuous if scfg.loop == "continuous" else lockstep
    build(prefix, prompts, group, scfg, keys)

  rollout_keys = ("data.prompts_per_step", "rollout.max_new_tokens", "mesh.tensor")
  sampler_programs("", Pn, G, _bind(stages[0].sampling, cfg), rollout_keys)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  # The learner's batch in each layout: packed rows fill PACKED_FILL of their slots. With
  # micro-batches a packed batch keeps the B rows and the step computes only the
  # micro-batches of its filled rows (trainer/batch.py); without, its rows are a bucket.
  filled = math.ceil(PACKED_FILL * B)
  packed = (B, filled) if o.micro_batch_rows else (bucket_rows(filled, shards, B),) * 2
  layouts = {  # rows, slots, loss positions, slot of loss position 0, rows computed
    "packed": (packed[0], S, S, 0, packed[1]),
    "padded": (B, S, C, Tp - 1, B),
  }
  rows_sh = batch_sharding(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  if use_pass:
    rows, s_, c_, head, _ = layouts[o.layout]
    ref_batch = abstract_batch(rows, s_, c_, head, rows_sh)
    ref_fn = make_logprobs_pass(graphdef, c.loss.vocab_chunk, o.micro_batch_rows, mesh)
    progs["reference"] = Program(
      "reference",
      ref_fn,
      lambda _: (params, ref_batch, scalar),
      {},
      # the reference params are its argument beside the train state; the old-logprobs
      # pass reads the train state's own params
      {"train state (params + optimizer)": state_bytes} if use_ref else beside_params,
      ("optim.micro_batch_rows", "rollout.max_new_tokens"),
      note=f"logprobs pass ({'reference' if use_ref else 'old logprobs'}) over {rows}"
      f" {o.layout} rows, in the learner's micro-batches",
    )
  other = "padded" if o.layout == "packed" else "packed"
  for i, loss_cfg in enumerate(losses):
    for lay in (o.layout, other) if i == 0 else (o.layout,):
      rows, s_, c_, head, computed = layouts[lay]
      batch = abstract_batch(rows, s_, c_, head, rows_sh)
      micro = o.micro_batch_rows or rows
      base = "train" if i == 0 else f"train_{losses[loss_cfg].name}"
      name = base if lay == o.layout else f"{base}_{lay}"
      step = make_train_step(
        graphdef,
        tx,
        loss_cfg,
        micro_batch_rows=o.micro_batch_rows,
        ppo_epochs=o.ppo_epochs,
        mesh=mesh,
        state_sharding=state_sh,
        remat=o.remat,
      )
      real = PACKED_FILL * B * S  # the same real tokens in either layout
      progs[name] = Program(
        name,
        step,
        lambda _, batch=batch: (state_abs, batch, scalar, scalar),
        {},
        ref,
        ("optim.micro_batch_rows", "rollout.max_new_tokens", "mesh.tensor", "optim.remat"),
        trips=-(-computed // micro) * o.ppo_epochs,  # the micro-batches it computes
        model_flops=train_model_flops(cfg, micro, S, mesh.size),
        hardware_flops=train_model_flops(cfg, micro, S, mesh.size) * (8 / 6 if o.remat else 1),
        real_tokens=real,
        note=f"{lay}: {-(-computed // micro)} of {rows // micro} micro-batches of {micro} rows"
        f" x {S} slots computed, remat={o.remat}",
      )
  if plan.eval.num_prompts > 0 and plan.data.eval is not None:
    sampler_programs(
      "eval_",
      plan.eval.prompts_per_call,  # one call of evaluate_policy
      plan.eval.num_samples,
      _bind(plan.eval.sampling, cfg),
      ("eval.batch_prompts", "eval.num_samples", "eval.max_new_tokens"),
    )
  return progs
