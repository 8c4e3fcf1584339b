"""Ahead-of-time compilation of a run's programs for a named TPU slice, and what the compiler
says about each: memory per device, FLOPs and bytes, the decode loop's collectives.

    python -m egrc_jax.plan --config=configs/r1_distill_1p5b.py --topology=v4-32 --compile

`compile_run(config, spec)` builds the run's mesh over the slice's compile-only devices
(`topology.py`), the programs (`programs.py`) and compiles each with libtpu's compiler; an
out-of-HBM refusal becomes a report with the compiler's figure. Definitions (per device):
  program bytes = arguments + outputs - aliased (donated) + temporaries + generated code
  required      = program bytes + resident (what the run holds outside the program's
                  arguments meanwhile, e.g. the optimizer state during the rollout)
  fits          = required <= the HBM the compiler lets a program use (`available_hbm_bytes`)
  roofline      = max(flops / peak bf16 FLOP/s, bytes accessed / HBM bandwidth); XLA's cost
                  analysis counts a loop body once, so for the decode loop this is about one
                  step and for the train step one micro-batch; `trips` x roofline estimates
                  the whole program. It counts a Pallas kernel (splash) as no FLOPs and the
                  loss's vocab-chunk loop once, so for the train step flops = the larger of
                  its count and the model FLOPs
  MFU bound     = model FLOPs of one micro-batch / (roofline x peak): the best the compiled
                  train step can do at the chip's peaks; remat's second forward (8 FLOPs per
                  parameter and token executed for 6 counted) caps it at 75%
"""

from __future__ import annotations

import dataclasses
import time

import jax

from egrc_jax.plan.hlo import LoopCollectives, arrays, main_loop_collectives
from egrc_jax.plan.programs import PROGRAMS, Program, model_config, run_programs
from egrc_jax.plan.topology import Slice, available_hbm_bytes, parse_oom, slice_mesh

GIB = 1024**3


@dataclasses.dataclass
class ProgramReport:
  name: str
  note: str
  keys: tuple[str, ...]
  resident: dict[str, int]
  available: int
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  code: int = 0
  program_bytes: int = 0  # arguments + outputs - alias + temporaries + code (or the OOM figure)
  flops: float = 0.0
  bytes_accessed: float = 0.0
  roofline_s: float = 0.0
  trips: int = 1
  model_flops: float = 0.0
  hardware_flops: float = 0.0
  real_tokens: float = 0.0  # train: the rollout's real tokens (over all devices)
  loop: LoopCollectives | None = None
  compile_s: float = 0.0
  error: str = ""  # the compiler's out-of-HBM message, when it refused

  @property
  def required(self) -> int:
    return self.program_bytes + sum(self.resident.values())

  @property
  def fits(self) -> bool:
    return not self.error and self.required <= self.available

  def mfu_bound(self, peak_flops: float) -> float | None:
    if not self.model_flops or not self.roofline_s:
      return None
    return self.model_flops / (self.roofline_s * peak_flops)

  def to_dict(self) -> dict:
    d = {k: v for k, v in dataclasses.asdict(self).items() if k != "loop"}
    d.update(required=self.required, fits=self.fits, keys=list(self.keys))
    d["loop_collectives"] = self.loop.to_dict() if self.loop else None
    return d


def _memory(report: ProgramReport, compiled) -> None:
  m = compiled.memory_analysis()
  report.argument = int(m.argument_size_in_bytes)
  report.output = int(m.output_size_in_bytes)
  report.alias = int(m.alias_size_in_bytes)
  report.temp = int(m.temp_size_in_bytes)
  report.code = int(m.generated_code_size_in_bytes)
  report.program_bytes = report.argument + report.output - report.alias + report.temp
  report.program_bytes += report.code


def _cost(report: ProgramReport, compiled, spec: Slice) -> None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  report.flops = float(cost.get("flops", 0.0))
  report.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  peaks = spec.peaks
  # XLA counts a while body once and a Pallas custom call (splash attention) as nothing, so
  # for the train step (a vocab-chunk loop inside each micro-batch) its count is below what
  # the chip executes; the roofline then takes the model's FLOPs with remat's recompute
  compute_s = max(report.flops, report.hardware_flops) / peaks.bf16_flops
  report.roofline_s = max(compute_s, report.bytes_accessed / peaks.hbm_bandwidth)


def compile_program(program: Program, spec: Slice, available: int, compiled: dict):
  """(ProgramReport, jax.stages.Compiled or None when the compiler ran out of HBM)."""
  report = ProgramReport(
    name=program.name,
    note=program.note,
    keys=program.keys,
    resident=dict(program.resident),
    available=available,
    trips=program.trips,
    model_flops=program.model_flops,
    hardware_flops=program.hardware_flops,
    real_tokens=program.real_tokens,
  )
  t0 = time.perf_counter()
  # A compile-only executable cannot be read back from JAX's persistent cache (it needs a
  # client with devices): keep it out of the cache, where it would only be an unreadable
  # entry. (Whether a process uses the cache at all is settled at its first compile, so
  # the write threshold is what can still be raised here.)
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    exe = program.lower(compiled).compile()
  except Exception as e:  # XLA raises JaxRuntimeError; only its out-of-HBM refusal is ours
    parsed = parse_oom(str(e))
    if parsed is None:
      raise RuntimeError(f"compiling {program.name} for {spec.name} failed: {e}") from e
    report.program_bytes, report.available = parsed[0], min(available, parsed[1])
    report.error = str(e).strip().splitlines()[0]
    report.compile_s = time.perf_counter() - t0
    return report, None
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  report.compile_s = time.perf_counter() - t0
  _memory(report, exe)
  _cost(report, exe, spec)
  if program.loop:
    report.loop = main_loop_collectives(exe.as_text(), program.param_sizes)
  return report, exe


@dataclasses.dataclass
class RunReport:
  spec: Slice
  mesh_shape: dict[str, int]
  model: str
  available: int
  layout: str
  programs: list[ProgramReport]
  config_values: dict[str, object]

  @property
  def fits(self) -> bool:
    return all(p.fits for p in self.programs)

  def failures(self) -> list[str]:
    """One actionable line per program that does not fit."""
    out = []
    for p in self.programs:
      if p.fits:
        continue
      parts = [f"program bytes {p.program_bytes / GIB:.2f}"]
      if not p.error:
        parts = [
          f"arguments {p.argument / GIB:.2f}",
          f"temporaries {p.temp / GIB:.2f}",
          f"outputs {p.output / GIB:.2f}",
        ]
      parts += [f"{k} {v / GIB:.2f}" for k, v in p.resident.items()]
      keys = ", ".join(f"{k} (now {self.config_values.get(k)})" for k in p.keys)
      why = f" (the compiler: {p.error})" if p.error else ""
      out.append(
        f"{p.name} does not fit on {self.spec.name}: needs {p.required / GIB:.2f} GiB per chip"
        f" ({', '.join(parts)} GiB) of {p.available / GIB:.2f} GiB available{why}; lower"
        f" one of: {keys}"
      )
    return out

  def to_dict(self) -> dict:
    return {
      "slice": dataclasses.asdict(self.spec),
      "mesh": self.mesh_shape,
      "model": self.model,
      "layout": self.layout,
      "available_bytes": self.available,
      "peak_bf16_flops": self.spec.peaks.bf16_flops,
      "hbm_bandwidth": self.spec.peaks.hbm_bandwidth,
      "fits": self.fits,
      "programs": [p.to_dict() for p in self.programs],
      "failures": self.failures(),
    }

  def table(self) -> str:
    s, g = self.spec, lambda b: f"{b / GIB:.2f}"
    mesh = ",".join(f"{k}:{v}" for k, v in self.mesh_shape.items())
    out = [
      f"{self.model} on {s.name} ({s.chips} x {s.kind}, topology {s.topology}; the compiler"
      f" allows {g(self.available)} GiB per chip), mesh {mesh}, decode layout {self.layout}",
      "| program | args | temps | outs | alias | code | resident | required | fits | GFLOP"
      " | GB accessed | roofline | trips | est. total | compile |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in self.programs:
      res = g(sum(p.resident.values()))
      verdict = "yes" if p.fits else "**NO**"
      if p.error:
        out.append(
          f"| {p.name} | (refused: {g(p.program_bytes)} GiB in all) | | | | | {res}"
          f" | {g(p.required)} | {verdict} | | | | | | {p.compile_s:.0f}s |"
        )
        continue
      out.append(
        f"| {p.name} | {g(p.argument)} | {g(p.temp)} | {g(p.output)} | {g(p.alias)}"
        f" | {p.code / 2**20:.0f}M | {res} | {g(p.required)} | {verdict} | {p.flops / 1e9:,.0f}"
        f" | {p.bytes_accessed / 1e9:,.1f} | {_t(p.roofline_s)} | {p.trips}"
        f" | {_t(p.roofline_s * p.trips)} | {p.compile_s:.0f}s |"
      )
    out.append("GiB per device; resident = held by the run outside the program's arguments;")
    out.append("roofline counts each loop body once (decode: ~one step; train: ~one micro-batch).")
    for p in self.programs:
      mfu = p.mfu_bound(s.peaks.bf16_flops)
      if mfu is not None:
        out.append(
          f"{p.name}: model FLOPs {p.model_flops / 1e12:.2f} TFLOP per device per micro-batch;"
          f" MFU upper bound {mfu:.1%} (model FLOPs / (roofline x {s.peaks.bf16_flops / 1e12:.0f}"
          f" TFLOP/s)); executed with remat {p.hardware_flops / 1e12:.2f} TFLOP, of which the"
          f" compiler's cost analysis counts {p.flops / p.hardware_flops:.0%} (Pallas kernels"
          " count none, a loop body once)"
        )
      if p.real_tokens and p.flops:
        # The compiler counts one loop body (one micro-batch); x trips gives the step.
        per_token = p.flops * p.trips * self.spec.chips / p.real_tokens
        out.append(
          f"{p.name}: {per_token / 1e6:,.1f} MFLOP (the compiler's count) per real token of the"
          f" rollout ({p.real_tokens:,.0f} real tokens)"
        )
      if p.loop is not None:
        out.append(_loop_lines(p))
    out += [f"DOES NOT FIT: {line}" for line in self.failures()]
    return "\n".join(out)


def _t(seconds: float) -> str:
  if seconds >= 1:
    return f"{seconds:,.1f}s"
  return f"{seconds * 1e3:.2f}ms"


def _loop_lines(p: ProgramReport) -> str:
  loop = p.loop
  ops = ", ".join(
    f"{n} {k} ({b / 2**20:,.2f} MiB)" for k, (n, b) in sorted(loop.by_opcode().items())
  )
  gathers = loop.param_gathers
  lines = [
    f"{p.name} while body {loop.body}: {loop.count} collectives per step,"
    f" {loop.bytes / GIB:.3f} GiB per step per device{': ' + ops if ops else ''};"
    f" parameter all-gathers: {len(gathers)} ({sum(c.bytes for c in gathers) / GIB:.3f} GiB"
    f" per step, {sum(c.bytes for c in gathers) * p.trips / GIB:,.0f} GiB over {p.trips} steps)"
  ]
  groups: dict[tuple, list] = {}
  for c in loop.collectives:  # identical ops (one per layer) on one line
    key = (c.opcode, _shape(c.operand), _shape(c.result), c.param_like)
    groups.setdefault(key, []).append(c)
  for (op, operand, result, param), cs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
    tag = " (parameter)" if param else ""
    lines.append(
      f"  {len(cs)} x {op}{tag} {operand} -> {result}: {cs[0].bytes / 2**20:,.2f} MiB each"
    )
  return "\n".join(lines)


def _shape(type_str: str) -> str:
  """'bf16[384,2,128]{2,0,1:T(8,128)}' -> 'bf16[384,2,128]' (the layout dropped)."""
  return ", ".join(f"{dt}[{','.join(map(str, d))}]" for dt, d in arrays(type_str)) or type_str


def compile_run(
  c,
  spec: Slice,
  names: tuple[str, ...] | None = None,
  layout: str = "sampling",
  log=print,
) -> RunReport:
  """Compile the programs `names` (default: all the run executes) of config `c` for slice
  `spec`, in execution order (the decode loop reads the prefill's output layout)."""
  mesh = slice_mesh(spec, c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  available = available_hbm_bytes(spec)
  progs = run_programs(c, mesh, layout)
  unknown = [n for n in names or () if n not in PROGRAMS and n not in progs]
  if unknown:
    raise ValueError(f"unknown program(s) {unknown}; known: {', '.join(PROGRAMS)}")
  # names are exact: "train" is the first stage's step; a later stage with its own loss
  # settings has its own, "train_<stage>" (all of them are compiled when names is None)
  chosen = [n for n in progs if names is None or n in names]
  if names:
    missing = [n for n in names if n not in progs and not any(c.startswith(n) for c in chosen)]
    if missing:
      log(f"not part of this run (e.g. reference needs loss.kl_kind): {', '.join(missing)}")
  compiled, reports = {}, []
  for name in chosen:
    log(f"compiling {name} ({progs[name].note}) ...")
    report, exe = compile_program(progs[name], spec, available, compiled)
    if exe is not None and name.endswith("prefill"):
      compiled[name] = exe  # the lock-step decode takes its output layout; others are dropped
      # (a compiled 7B train step holds gigabytes of host memory)
    reports.append(report)
    verdict = "fits" if report.fits else "DOES NOT FIT"
    log(
      f"  {name}: {report.required / GIB:.2f} of {available / GIB:.2f} GiB per chip, {verdict}"
      f" (compiled in {report.compile_s:.0f}s)"
    )
  cfg = model_config(c)
  model = (
    f"{c.model.preset} (L={cfg.num_layers} D={cfg.hidden_size}, {cfg.num_params() / 1e9:.2f}B,"
    f" params {cfg.param_dtype}, compute {cfg.dtype})"
  )
  values = {}
  for p in reports:
    for k in p.keys:
      section, key = k.split(".")
      values[k] = c[section][key]
  return RunReport(spec, dict(mesh.shape), model, available, layout, reports, values)
