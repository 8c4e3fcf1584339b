"""Per-device memory plan terms of an EGRC run, from shapes alone (no devices, no allocation).

    python -m egrc_jax.plan --preset=r1_distill_1p5b --chip=v4 --num_chips=16 \
      --mesh=data:1,fsdp:16,tensor:1 --rollout_batch=512 --max_prompt=1024 \
      --max_new_tokens=8192 --micro_batch=16 --remat=full

Parameter shard shapes come from `nnx.eval_shape` (`sharding.abstract_model`) and the real
sharding rules (`sharding.state_shardings`) over a `jax.sharding.AbstractMesh`, so they are
exactly what `create_sharded` would allocate. Activation terms are estimates whose formulas
are printed next to each number (see `activation_terms`).

Shape letters: L layers, D hidden, F MLP width, V vocab, N query heads, K kv heads, H head
dim; b micro-batch rows per device, T training sequence length; r rollout rows per device,
S cache length (prompt + new tokens), p prefill rows per device, P prompt length; t_h, t_k,
t_f, t_v: tensor shards of heads, kv heads, MLP width, vocab (1 when the tensor axis does not
divide that dimension, the `logical_to_spec` fallback); a: compute-dtype bytes.

Programs: each term belongs to a phase, and each program of a step (prefill, reshard,
decode, train, reference) holds `state + its phases` (`settings.PROGRAM_PHASES`); programs
never overlap, so the peak is the largest. `python -m egrc_jax.plan ... --compile --compare`
checks every program against libtpu's compiler (docs/memory_plan.md).
C = S - P new tokens; C_v = min(vocab_chunk, V/t_v) columns of the loss's vocab loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from egrc_jax.model import ModelConfig
from egrc_jax.plan.settings import (
  OPTIMIZER_MOMENTS,
  MemoryPlan,
  PlanSettings,
  Term,
  nbytes,
)
from egrc_jax.sharding import (
  MESH_AXES,
  abstract_model,
  keeps_param_dtype,
  sampling_shardings,
  state_shardings,
)


def abstract_mesh(mesh_shape: dict[str, int]) -> AbstractMesh:
  sizes = tuple(int(mesh_shape[a]) for a in MESH_AXES)
  return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_elements_per_device(cfg: ModelConfig, mesh_shape: dict[str, int]) -> int:
  """Elements of every parameter's shard on one device, from eval_shape and the rules table."""
  return _param_elements(cfg, tuple(int(mesh_shape.get(a, 1)) for a in MESH_AXES))


@functools.lru_cache(maxsize=32)  # eval_shape of a 7B model takes ~1 s; plans repeat meshes
def _param_elements(cfg: ModelConfig, sizes: tuple[int, ...]) -> int:
  _, state = abstract_model(cfg)
  shardings = state_shardings(state, abstract_mesh(dict(zip(MESH_AXES, sizes, strict=True))))
  is_var = lambda x: isinstance(x, nnx.Variable)
  total = 0
  for var, sh in zip(
    jax.tree.leaves(state, is_leaf=is_var), jax.tree.leaves(shardings, is_leaf=is_var), strict=True
  ):
    total += math.prod(sh.get_value().shard_shape(var.shape))
  return int(total)


# f32 [rows, vocab] buffers one decode step holds at once (`rollout_terms`); calibrated
# against libtpu's compiler: 2000 continuous slots per v4 chip, 1.5B width (tests/test_aot.py)
VOCAB_BUFFERS = 14


def _split(n: int, shards: int) -> int:
  """Shards a dimension of size n is split into: the logical_to_spec divisibility fallback."""
  return shards if n % shards == 0 else 1


def kv_cache_bytes(cfg: ModelConfig, s: PlanSettings, rows: int) -> int:
  """2 (k and v) x L x (rows / (data fsdp)) x S x (K / t_k) x H x kv bytes + the bool mask."""
  r = rows // (s.data * s.fsdp)
  K = cfg.num_kv_heads // _split(cfg.num_kv_heads, s.tensor)
  kv = 2 * cfg.num_layers * r * s.cache_len * K * cfg.head_dim * nbytes(s.kv_dtype)
  return kv + r * s.cache_len  # valid_BS


@functools.lru_cache(maxsize=32)
def _sampling_elements(cfg: ModelConfig, sizes: tuple[int, ...]) -> tuple[int, int]:
  """(norm-scale elements, other elements) per device in the sampling layout."""
  _, state = abstract_model(cfg)
  mesh = abstract_mesh(dict(zip(MESH_AXES, sizes, strict=True)))
  shardings = sampling_shardings(state, mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
  norm = other = 0
  for (path, var), sh in zip(flat, jax.tree.leaves(shardings, is_leaf=is_var), strict=True):
    n = math.prod(sh.get_value().shard_shape(var.shape))
    norm, other = (norm + n, other) if keeps_param_dtype(path) else (norm, other + n)
  return norm, other


def sampling_param_bytes(cfg: ModelConfig, s: PlanSettings) -> int:
  """Bytes per device of the sampling copy: norm scales in param dtype, every other weight
  in the narrower of the param and compute dtypes (`sharding.sampling_dtype`)."""
  norm, other = _sampling_elements(cfg, tuple(int(v) for _, v in s.mesh_shape))
  pb = nbytes(s.param_dtype)
  return norm * pb + other * min(pb, nbytes(s.compute_dtype))


def linear_bytes(cfg: ModelConfig, s: PlanSettings, b: int, T: int) -> tuple[int, str]:
  """One block's activations besides the attention scores, per device."""
  a, t = nbytes(s.compute_dtype), s.tensor
  D, F, N, K, H = (
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
  )
  Nt, Kt, Ft = N // _split(N, t), K // _split(K, t), F // _split(F, t)
  linear = b * T * (a * (4 * D + 2 * Nt * H + 2 * Kt * H + 3 * Ft) + 4 * 2 * D)
  return linear, "b T [a (4D + 2N/t_h H + 2K/t_k H + 3F/t_f) + 8D]"


def layer_bytes(cfg: ModelConfig, s: PlanSettings, b: int, T: int, S: int) -> tuple[int, str]:
  """What one learner block keeps for its backward (or holds at once in a forward)."""
  a = nbytes(s.compute_dtype)
  Nt = cfg.num_heads // _split(cfg.num_heads, s.tensor)
  linear, formula = linear_bytes(cfg, s, b, T)
  if s.attention == "dense":
    scores = b * Nt * T * S * (4 + a)
    formula += " + b N/t_h T S (4 + a)"
  else:
    scores = b * Nt * T * 4 * 2
    formula += " + 8 b N/t_h T"
  return linear + scores, formula


def activation_terms(cfg: ModelConfig, s: PlanSettings) -> list[Term]:
  """Learner activations of one micro-batch (b rows per device, length T).

  none: (L + 1) x layer   -- every block's saved tensors, plus one block's cotangents.
  full: L b T D a + 2 x layer -- block inputs only; one block recomputed plus its cotangents.
  head: b T D (a + 4) + 3 b T C_v 4 + D/f V/t_v 4 -- final hidden and its cotangent; one vocab
        chunk's f32 logits, probabilities and cotangent for every position (the loss loops
        over C_v = min(vocab_chunk, V/t_v) columns at a time); the f32 lm-head gradient.
  """
  b, T, L = s.micro_batch_rows // (s.data * s.fsdp), s.seq_len, cfg.num_layers
  a = nbytes(s.compute_dtype)
  layer, lf = layer_bytes(cfg, s, b, T, T)
  if s.remat == "none":
    blocks, bf = (L + 1) * layer, f"(L + 1) x layer; layer = {lf}"
  else:
    blocks = L * b * T * cfg.hidden_size * a + 2 * layer
    bf = f"L b T D a + 2 x layer; layer = {lf}"
  V = cfg.vocab_size // _split(cfg.vocab_size, s.tensor)
  chunk = min(s.vocab_chunk, V)
  head = b * T * cfg.hidden_size * (a + 4) + 3 * b * T * chunk * 4
  head += cfg.hidden_size // _split(cfg.hidden_size, s.fsdp) * V * 4
  return [
    Term(f"activations (remat={s.remat}, {s.attention})", "train", blocks, bf),
    Term(
      "final hidden + logits/entropy chunk",
      "train",
      head,
      f"b T D (a + 4) + 3 b T min({s.vocab_chunk}, V/t_v) 4 + D/f V/t_v 4",
    ),
  ]


def reference_terms(cfg: ModelConfig, s: PlanSettings) -> list[Term]:
  """The reference pass (KL on): a forward, no backward, in the learner's micro-batches (b
  rows per device of length T): the residual stream and its normed copy (2 b T D a), then
  the larger of one MLP's gate and up projections (2 b T F/t_f a) and one vocab chunk's
  f32 logits (b T C_v 4), which are never live together; attention adds its scores when
  dense (b N/t_h T T (8 + a)) and only row statistics otherwise."""
  b, T, a = s.micro_batch_rows // (s.data * s.fsdp), s.seq_len, nbytes(s.compute_dtype)
  Nt = cfg.num_heads // _split(cfg.num_heads, s.tensor)
  Ft = cfg.intermediate_size // _split(cfg.intermediate_size, s.tensor)
  V = cfg.vocab_size // _split(cfg.vocab_size, s.tensor)
  scores = b * Nt * T * T * (8 + a) if s.attention == "dense" else b * Nt * T * 8
  peak = max(2 * b * T * Ft * a, b * T * min(s.vocab_chunk, V) * 4)
  # one vocab matrix gathered whole over fsdp in f32 (the embedding table for the lookup or
  # the lm head), which the compiler keeps beside the activations (1.5B on a v4-32: 0.87 GiB)
  gathered = V * cfg.hidden_size * 4
  work = 2 * b * T * cfg.hidden_size * a + peak + scores + gathered
  att = "b N/t_h T T (8 + a)" if s.attention == "dense" else "8 b N/t_h T"
  formula = f"2 b T D a + max(2 b T F/t_f a, b T C_v 4) + {att} + V/t_v D 4"
  return [Term("reference forward (one micro-batch)", "reference", work, formula)]


def rollout_terms(cfg: ModelConfig, s: PlanSettings) -> list[Term]:
  """What the rollout programs hold besides the learner's state (r rows per device).

  rollout: the KV cache of the r rows (the prefill's output, the decode's carry).
  sampling (reshard and decode, when `sampling_layout`): the copy of the params the decode
           reads, every weight without fsdp in the compute dtype, made after the prefill.
  prefill: KV(p) + scores + linear(p, P) -- the prompt rows' own cache (the G-fold repeat
           into KV(r) is its output) and the prompt attending to itself (`_prompt_scores`).
  decode:  14 r V/t_v 4 + r N/t_h S (4 + a) + 17 r C -- one step's vocab-wide f32 buffers
           (VOCAB_BUFFERS: logits, tempered logits, the top-p sort's values and indices,
           cumulative sums, probabilities, log-probabilities and entropy terms; 14 is the
           compiler's count at 2000 rows per chip, where they dominate), one layer's scores
           against the cache, and the [r, C] outputs (int32 tokens, bool mask, three f32
           statistics).
  reshard: at most one more sampling copy -- each weight arrives from its all-gather in a
           receive buffer and is laid out into the copy; XLA reuses some of those buffers
           across weights (the compiler: 62% of a copy for 1.5B on fsdp 16, 100% for 7B on
           fsdp 4 x tensor 4), so this is an upper bound.
  """
  if s.loop == "continuous":
    return _continuous_terms(cfg, s)
  rows = s.data * s.fsdp
  r = s.rollout_rows // rows
  Nt = cfg.num_heads // _split(cfg.num_heads, s.tensor)
  kv = kv_cache_bytes(cfg, s, s.rollout_rows)
  terms = [Term("KV cache (rollout rows)", "rollout", kv, "2 L r S K/t_k H a_kv + r S")]
  terms += _sampling_copy_terms(cfg, s)
  terms.append(_decode_step_term(cfg, s, r, r, "r", "r"))
  if s.prompt_len:
    p = (s.prefill_rows or s.rollout_rows) // rows
    kv_p = kv_cache_bytes(cfg, s, s.prefill_rows or s.rollout_rows)
    linear, _ = linear_bytes(cfg, s, p, s.prompt_len)
    scores, sf = _prompt_scores(s, p, Nt, s.prompt_len)
    prefill = kv_p + scores + linear
    terms.append(Term("prefill working set", "prefill", prefill, f"KV(p) + {sf} + linear(p, P)"))
  return terms


def _prompt_scores(s: PlanSettings, p: int, Nt: int, P: int) -> tuple[int, str]:
  """The prefill's attention: P prompt tokens attend to themselves (`Transformer.prefill`);
  dense holds f32 scores twice (XLA may overlap two blocks' softmax) and bf16
  probabilities, flash (splash / blocked) only row statistics."""
  if s.attention == "dense":
    return p * Nt * P * P * (8 + nbytes(s.compute_dtype)), "p N/t_h P P (8 + a)"
  return p * Nt * P * 8, "8 p N/t_h P"


def _decode_step_term(cfg, s: PlanSettings, b: int, pairs: int, bs: str, ps: str) -> Term:
  """One decode step of b rows per device: the vocab-wide f32 buffers, one layer's scores
  against the cache, and the [pairs, C] outputs (`rollout_terms`' docstring)."""
  a = nbytes(s.compute_dtype)
  V = cfg.vocab_size // _split(cfg.vocab_size, s.tensor)
  Nt = cfg.num_heads // _split(cfg.num_heads, s.tensor)
  C = s.cache_len - s.prompt_len
  decode = VOCAB_BUFFERS * b * V * 4 + b * Nt * s.cache_len * (4 + a) + 17 * pairs * C
  formula = f"{VOCAB_BUFFERS} {bs} V/t_v 4 + {bs} N/t_h S (4 + a) + 17 {ps} C"
  return Term("decode step working set", "decode", decode, formula)


def _sampling_copy_terms(cfg: ModelConfig, s: PlanSettings) -> list[Term]:
  if not s.sampling_layout:
    return []
  copy = sampling_param_bytes(cfg, s)
  return [
    Term("sampling params (no fsdp)", "sampling", copy, "params/t in min(param, compute) B"),
    Term("reshard gather buffers", "reshard", copy, "<= the sampling params"),
  ]


def _continuous_terms(cfg: ModelConfig, s: PlanSettings) -> list[Term]:
  """rollout.loop = continuous: B = num_slots rows decode at once and are refilled; the KV
  is one prompt cache per group (P prompts x P_len) plus B completion slots in `kv_layout`
  (`sampler.layouts.kv_layout_bytes`). The prompts and slots split over the D = data x fsdp
  batch shards when D divides both, else the prompt cache is replicated on every device.

  prefill: scores + linear(p, P_len) of the p = P/D prompts attending to themselves
           (`_prompt_scores`); its output is the prompt caches.
  decode:  b = B/D rows: 14 b V/t_v 4 + b N/t_h S (4 + a) + per-pair outputs 17 (P G / D) C.
  """
  from egrc_jax.sampler.config import SamplingConfig  # noqa: PLC0415
  from egrc_jax.sampler.layouts import kv_layout_bytes  # noqa: PLC0415

  D = s.data * s.fsdp
  Nt = cfg.num_heads // _split(cfg.num_heads, s.tensor)
  Kt = cfg.num_kv_heads // _split(cfg.num_kv_heads, s.tensor)
  prompts = s.prefill_rows or s.rollout_rows
  slots = min(s.num_slots, s.rollout_rows)
  split = prompts % D == 0 and slots % D == 0
  C, Pl = s.cache_len - s.prompt_len, s.prompt_len
  scfg = SamplingConfig(max_new_tokens=C, page_size=s.page_size)
  kv_cfg = dataclasses.replace(cfg, dtype=s.kv_dtype, num_kv_heads=Kt)
  kv = kv_layout_bytes(kv_cfg, scfg, prompts, Pl, slots, s.kv_layout)
  prompt_kv = kv["prompt"] // D if split else kv["prompt"]
  slot_kv = kv["completion"] // D if slots % D == 0 else kv["completion"]
  terms = [
    Term("KV: prompt caches (one per group)", "rollout", prompt_kv,
         f"2 L P{'/D' if split else ''} P_len K/t_k H a_kv ({s.kv_layout})"),
    Term(f"KV: {slots} completion slots", "decode", slot_kv,
         f"2 L B/D slot_len K/t_k H a_kv ({s.kv_layout})"),
  ]  # fmt: skip
  terms += _sampling_copy_terms(cfg, s)
  terms.append(_decode_step_term(cfg, s, max(slots // D, 1), s.rollout_rows // D, "b", "(P G/D)"))
  if Pl:
    p = prompts // D if split else prompts
    linear, _ = linear_bytes(cfg, s, p, Pl)
    scores, sf = _prompt_scores(s, p, Nt, Pl)
    terms.append(Term("prefill working set", "prefill", scores + linear, f"{sf} + linear(p, P)"))
  return terms


def plan_memory(
  model_cfg: ModelConfig,
  mesh_shape: dict[str, int],
  chip: str,
  rollout_rows: int,
  cache_len: int,
  micro_batch_rows: int,
  seq_len: int,
  remat: str = "full",
  optimizer: str = "adamw",
  param_dtype: str | None = None,
  opt_state_dtype: str = "float32",
  reference: bool = False,
  **more,
) -> MemoryPlan:
  """The per-device memory plan. `more` sets the other `PlanSettings` fields."""
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are unknown; use {MESH_AXES}")
  shape = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
  more.setdefault("kv_dtype", model_cfg.dtype)
  more.setdefault("compute_dtype", model_cfg.dtype)
  s = PlanSettings(
    mesh_shape=tuple(shape.items()),
    chip=chip,
    rollout_rows=rollout_rows,
    cache_len=cache_len,
    micro_batch_rows=micro_batch_rows,
    seq_len=seq_len,
    remat=remat,
    optimizer=optimizer,
    param_dtype=param_dtype or model_cfg.param_dtype,
    opt_state_dtype=opt_state_dtype,
    reference=reference,
    **more,
  )
  n = param_elements_per_device(model_cfg, shape)
  pb = nbytes(s.param_dtype)
  terms = [Term("params", "state", n * pb, f"params/device {n:,} x {pb} B")]
  master = s.master_dtype is not None and s.master_dtype != s.param_dtype
  if master:
    mb = nbytes(s.master_dtype)
    terms.append(Term(f"master params ({s.master_dtype})", "state", n * mb, f"{n:,} x {mb} B"))
  moments = OPTIMIZER_MOMENTS[s.optimizer]
  if moments:
    ob = nbytes(s.opt_state_dtype)
    terms.append(
      Term(
        f"{s.optimizer} moments ({s.opt_state_dtype})",
        "state",
        moments * n * ob,
        f"{moments} x {n:,} x {ob} B",
      )
    )
  if s.reference:
    terms.append(Term("reference params (KL on)", "state", n * pb, f"{n:,} x {pb} B"))
  terms += rollout_terms(model_cfg, s)
  if s.reference or s.logprobs_pass:
    terms += reference_terms(model_cfg, s)
  gb = nbytes(s.grad_dtype)
  terms.append(
    Term("gradients (accumulator + micro)", "train", n * (gb + pb), f"{n:,} x ({gb} + {pb}) B")
  )
  terms += activation_terms(model_cfg, s)
  assumptions = (
    "params sharded by the RULES table (embed over fsdp; heads/mlp/vocab over tensor when it"
    " divides); shard shapes from nnx.eval_shape over an AbstractMesh",
    f"master copy: {'kept' if master else 'none'} (master_dtype={s.master_dtype},"
    f" param_dtype={s.param_dtype}); optimizer {s.optimizer} with {moments} moment(s)"
    f" in {s.opt_state_dtype}, sharded like the params",
    f"gradients: one {s.grad_dtype} accumulator over micro-batches plus one micro-batch's"
    " grads in param dtype; the update is donated in place (no second copy of the state)",
    "programs never overlap: each needs state + its own terms (prefill: KV cache + its"
    " working set; reshard: KV cache + sampling copy + gather buffers; decode: KV cache +"
    " sampling copy + one step; train; reference), and the peak is the largest",
    "rollout params: "
    + (
      "a copy without fsdp in the compute dtype, made once per rollout (sharding.py)"
      if s.sampling_layout
      else "the learner's FSDP arrays (each decode step gathers them)"
    ),
    f"activation formulas are estimates (XLA fusion changes them by tens of percent);"
    f" attention={s.attention}: dense holds f32 scores + probs [N/t_h, T, S] per block",
    f"reserve {s.reserve:.0%} of HBM for XLA scratch, collectives buffers and fragmentation",
  )
  desc = (
    f"{model_cfg.model_type} L={model_cfg.num_layers} D={model_cfg.hidden_size}"
    f" ({model_cfg.num_params() / 1e9:.2f}B params)"
  )
  return MemoryPlan(settings=s, model=desc, terms=tuple(terms), assumptions=assumptions)
