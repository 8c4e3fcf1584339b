"""Settings, chip table and the result type of the memory plan (see `egrc_jax.plan`)."""

from __future__ import annotations

import dataclasses
import math

from egrc_jax.sharding import MESH_AXES

GIB = 1024**3
# HBM per chip (per JAX device: v4 and v5p chips are one megacore device each).
CHIP_HBM_GIB: dict[str, float] = {
  "v4": 32,
  "v5e": 16,
  "v5p": 95,
  "v6e": 32,
  "H100": 80,
  "H200": 141,
}
ITEMSIZE = {"float32": 4, "bfloat16": 2}
OPTIMIZER_MOMENTS = {"adamw": 2, "sgd": 0}  # moment buffers per parameter
REMAT_MODES = ("full", "none")
ATTENTION_MODES = ("dense", "flash")
DTYPES = tuple(ITEMSIZE)
LOOPS = ("lockstep", "continuous")
KV_LAYOUTS = ("dense", "split", "paged")


def nbytes(dtype: str) -> int:
  return ITEMSIZE[dtype]


@dataclasses.dataclass(frozen=True)
class PlanSettings:
  """Everything the plan depends on besides the model config. Row counts are global."""

  mesh_shape: tuple[tuple[str, int], ...]  # (("data", 1), ("fsdp", 16), ("tensor", 1))
  chip: str  # a key of CHIP_HBM_GIB
  rollout_rows: int  # rows decoded concurrently (prompts x G), over data x fsdp
  cache_len: int  # S = max prompt + max new tokens
  micro_batch_rows: int  # rows of one learner micro-batch, over data x fsdp
  seq_len: int  # T of a learner micro-batch
  remat: str = "full"  # full: each block rematerialised; none: autodiff keeps everything
  optimizer: str = "adamw"
  param_dtype: str = "bfloat16"  # live params (what the sampler and forward read)
  opt_state_dtype: str = "float32"  # the optimizer moments
  master_dtype: str | None = "float32"  # master copy kept when it differs from param_dtype
  grad_dtype: str = "float32"  # the gradient accumulator over micro-batches
  reference: bool = False  # frozen reference params (KL on)
  logprobs_pass: bool = False  # the learner's forward-only pass runs (KL, or old logprobs)
  kv_dtype: str = "bfloat16"
  compute_dtype: str = "bfloat16"
  attention: str = "dense"  # dense: [T, S] scores materialised (today's model); flash: not
  prefill_rows: int = 0  # rows prefilled before the G-fold repeat; 0 means rollout_rows
  prompt_len: int = 0  # P; 0 means no prefill term
  vocab_chunk: int = 8192  # loss.vocab_chunk: vocab columns whose f32 logits live at once
  sampling_layout: bool = True  # the rollout reads a bf16 copy of the params without FSDP
  reserve: float = 0.10  # HBM fraction held back for XLA scratch, fragmentation, runtime
  # rollout.loop: lockstep decodes rollout_rows rows at once; continuous decodes num_slots
  # rows and refills them (KV of kv_layout: `sampler.layouts.kv_layout_bytes`)
  loop: str = "lockstep"
  num_slots: int = 0
  kv_layout: str = "dense"  # dense | split | paged (auto resolved: paged on TPU)
  page_size: int = 16

  def __post_init__(self):
    names = tuple(n for n, _ in self.mesh_shape)
    if names != MESH_AXES:
      raise ValueError(f"mesh axes {names}: give exactly {MESH_AXES} in that order")
    if any(s < 1 for _, s in self.mesh_shape):
      raise ValueError(f"mesh {dict(self.mesh_shape)}: every axis size must be >= 1")
    if self.chip not in CHIP_HBM_GIB:
      raise ValueError(f"unknown chip {self.chip!r}; known chips: {sorted(CHIP_HBM_GIB)}")
    for name in ("remat", "optimizer", "attention"):
      known = {
        "remat": REMAT_MODES,
        "optimizer": tuple(OPTIMIZER_MOMENTS),
        "attention": ATTENTION_MODES,
      }[name]
      if getattr(self, name) not in known:
        raise ValueError(f"{name}={getattr(self, name)!r}: use one of {known}")
    for name in ("param_dtype", "opt_state_dtype", "grad_dtype", "kv_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}: use one of {DTYPES}")
    if self.master_dtype not in (None, *DTYPES):
      raise ValueError(f"master_dtype={self.master_dtype!r}: use None or one of {DTYPES}")
    rows = self.data * self.fsdp
    for name in ("rollout_rows", "micro_batch_rows", "prefill_rows"):
      n = getattr(self, name)
      # the continuous loop splits its slots, not the rollout's rows (it replicates prompts
      # that do not split)
      loose = self.loop == "continuous" and name != "micro_batch_rows"
      if n < 0 or (name != "prefill_rows" and n == 0) or (n % rows and not loose):
        raise ValueError(
          f"{name}={n} must be a positive multiple of data x fsdp = {rows} (rows are split"
          " over data x fsdp; a count that does not divide would replicate the batch)"
        )
    for name in ("cache_len", "seq_len", "vocab_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if not 0 <= self.prompt_len <= self.cache_len:
      raise ValueError(f"prompt_len={self.prompt_len} must be in [0, cache_len={self.cache_len}]")
    if self.loop not in LOOPS:
      raise ValueError(f"loop={self.loop!r}: use one of {LOOPS}")
    if self.kv_layout not in KV_LAYOUTS:
      raise ValueError(f"kv_layout={self.kv_layout!r}: use one of {KV_LAYOUTS}")
    if self.loop == "continuous" and self.num_slots < 1:
      raise ValueError(f"num_slots={self.num_slots}: the continuous loop needs >= 1 slot")
    if self.page_size < 1:
      raise ValueError(f"page_size={self.page_size} must be >= 1")
    if not 0 <= self.reserve < 1:
      raise ValueError(f"reserve={self.reserve} must be a fraction in [0, 1)")

  data = property(lambda self: dict(self.mesh_shape)["data"])
  fsdp = property(lambda self: dict(self.mesh_shape)["fsdp"])
  tensor = property(lambda self: dict(self.mesh_shape)["tensor"])
  num_chips = property(lambda self: math.prod(s for _, s in self.mesh_shape))


# Which term phases each program of a step holds on top of the "state" terms.
PROGRAM_PHASES: dict[str, tuple[str, ...]] = {
  "prefill": ("rollout", "prefill"),
  "reshard": ("rollout", "sampling", "reshard"),  # the sampling copy, beside the KV cache
  "decode": ("rollout", "sampling", "decode"),
  "train": ("train",),
  "reference": ("reference",),
}


@dataclasses.dataclass(frozen=True)
class Term:
  name: str
  phase: str  # state | sampling | rollout | prefill | decode | reshard | train | reference
  bytes: int  # per device
  formula: str


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  settings: PlanSettings
  model: str  # a short description of the model
  terms: tuple[Term, ...]
  assumptions: tuple[str, ...]

  def phase_bytes(self, phase: str) -> int:
    return sum(t.bytes for t in self.terms if t.phase == phase)

  def program_bytes(self) -> dict[str, int]:
    """Per-device bytes of each program the plan has terms for: state + its phases."""
    state, out = self.phase_bytes("state"), {}
    for name, phases in PROGRAM_PHASES.items():
      if any(t.phase == phases[-1] for t in self.terms):
        out[name] = state + sum(self.phase_bytes(p) for p in phases)
    return out

  @property
  def rollout_bytes(self) -> int:
    """The larger rollout program (prefill or decode), less the state."""
    progs = self.program_bytes()
    return max(progs.get(n, 0) for n in ("prefill", "decode")) - self.phase_bytes("state")

  @property
  def hbm_bytes(self) -> int:
    return int(CHIP_HBM_GIB[self.settings.chip] * GIB)

  @property
  def usable_bytes(self) -> int:
    return int(self.hbm_bytes * (1 - self.settings.reserve))

  @property
  def peak_bytes(self) -> int:
    return max(self.program_bytes().values())

  @property
  def headroom_bytes(self) -> int:
    return self.usable_bytes - self.peak_bytes

  @property
  def fits(self) -> bool:
    return self.headroom_bytes >= 0

  def to_dict(self) -> dict:
    return {
      "model": self.model,
      "settings": {
        **dataclasses.asdict(self.settings),
        "mesh_shape": dict(self.settings.mesh_shape),
      },
      "terms": [dataclasses.asdict(t) for t in self.terms],
      "state_bytes": self.phase_bytes("state"),
      "rollout_bytes": self.rollout_bytes,
      "train_bytes": self.phase_bytes("train"),
      "program_bytes": self.program_bytes(),
      "peak_bytes": self.peak_bytes,
      "hbm_bytes": self.hbm_bytes,
      "usable_bytes": self.usable_bytes,
      "headroom_bytes": self.headroom_bytes,
      "fits": self.fits,
      "assumptions": list(self.assumptions),
    }

  def table(self) -> str:
    s = self.settings
    mesh = ",".join(f"{n}:{v}" for n, v in s.mesh_shape)
    out = [f"{self.model} on {s.num_chips} x {s.chip} ({CHIP_HBM_GIB[s.chip]:g} GiB), mesh {mesh}"]
    out.append(f"| {'phase':9} | {'term':38} | {'GiB/device':>10} | formula |")
    out.append(f"|{'-' * 11}|{'-' * 40}|{'-' * 12}|---------|")
    for t in self.terms:
      out.append(f"| {t.phase:9} | {t.name:38} | {t.bytes / GIB:10.3f} | {t.formula} |")
    out.append(f"| {'state':9} | {'= total':38} | {self.phase_bytes('state') / GIB:10.3f} | |")
    for name, total in self.program_bytes().items():
      phases = " + ".join(PROGRAM_PHASES[name])
      out.append(f"| {name:9} | {'= state + ' + phases:38} | {total / GIB:10.3f} | |")
    verdict = "FITS" if self.fits else "DOES NOT FIT"
    out.append(
      f"peak = the largest program = {self.peak_bytes / GIB:.2f} GiB of "
      f"{self.usable_bytes / GIB:.2f} GiB usable ({s.reserve:.0%} of {self.hbm_bytes / GIB:g} GiB"
      f" reserved): {verdict}, headroom {self.headroom_bytes / GIB:+.2f} GiB"
    )
    out += [f"- {a}" for a in self.assumptions]
    return "\n".join(out)
