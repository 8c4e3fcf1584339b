"""Command line of the memory plan: `python -m egrc_jax.plan --help`."""

from __future__ import annotations

import argparse
import json
import math
import sys

from egrc_jax import cli
from egrc_jax.model import get_preset
from egrc_jax.plan.memory import plan_memory
from egrc_jax.plan.programs import PROGRAMS
from egrc_jax.plan.settings import (
  ATTENTION_MODES,
  CHIP_HBM_GIB,
  DTYPES,
  KV_LAYOUTS,
  LOOPS,
  OPTIMIZER_MOMENTS,
  REMAT_MODES,
)
from egrc_jax.plan.topology import slice_spec
from egrc_jax.sampler.config import SamplingConfig
from egrc_jax.sampler.generate import LAYOUTS
from egrc_jax.sharding import MESH_AXES


def parse_mesh(text: str, num_chips: int) -> dict[str, int]:
  """'data:1,fsdp:16,tensor:1' -> {'data': 1, 'fsdp': 16, 'tensor': 1}; product == num_chips."""
  mesh = {}
  for part in text.split(","):
    name, sep, size = part.partition(":")
    if not sep or name.strip() not in MESH_AXES or not size.strip().isdigit():
      raise ValueError(
        f"bad mesh entry {part!r} in {text!r}: write axis:size with axes from"
        f" {MESH_AXES}, e.g. data:1,fsdp:16,tensor:1"
      )
    mesh[name.strip()] = int(size)
  shape = {a: mesh.get(a, 1) for a in MESH_AXES}
  if math.prod(shape.values()) != num_chips:
    raise ValueError(
      f"mesh {text!r} has {math.prod(shape.values())} devices but"
      f" --num_chips={num_chips}; make the product of the axis sizes match"
    )
  return shape


def _parser() -> argparse.ArgumentParser:
  p = cli.Parser(
    prog="python -m egrc_jax.plan", description="Per-device memory plan of an EGRC run."
  )
  p.add_argument(
    "--config",
    default=None,
    help="configs/<file>.py[:overrides]: take the preset, mesh, batch, lengths, micro-batch"
    " and KL setting from a run config (explicit flags win)",
  )
  p.add_argument(
    "--set",
    default="",
    help="more config overrides key=value,... (after the --config suffix's), e.g."
    " rollout.max_new_tokens=2048",
  )
  p.add_argument(
    "--topology",
    default=None,
    help="a named TPU slice (v4-32, v5p-16, v5e-8 / v5litepod-8, v6e-8): sets --chip and"
    " --num_chips; with --compile, the slice the programs are compiled for",
  )
  p.add_argument(
    "--compile",
    action="store_true",
    help="compile every program of the run (--config) ahead of time for --topology with"
    " libtpu's compiler and report its memory, FLOPs and decode-loop collectives; exits 1"
    " when a program does not fit (needs the [aot] extra)",
  )
  p.add_argument(
    "--programs",
    default="",
    help=f"with --compile: a comma-separated subset of {','.join(PROGRAMS)}",
  )
  p.add_argument(
    "--layout",
    default="sampling",
    choices=LAYOUTS,
    help="with --compile: the decode's parameter layout (training: the learner's FSDP arrays,"
    " as before the sampling copy)",
  )
  p.add_argument(
    "--compare",
    action="store_true",
    help="with --compile: also print the formula plan against the compiler, per program",
  )
  p.add_argument("--preset", help="model preset, e.g. r1_distill_1p5b")
  p.add_argument("--chip", default=None, help=f"one of {sorted(CHIP_HBM_GIB)}")
  p.add_argument("--num_chips", type=int, default=None)
  p.add_argument("--mesh", help="data:D,fsdp:F,tensor:T (product = num_chips)")
  p.add_argument(
    "--rollout_batch",
    type=int,
    help="rows decoded concurrently = prompts x group size (global)",
  )
  p.add_argument("--group_size", type=int, default=None, help="G: prefill rows = rollout_batch / G")
  p.add_argument("--max_prompt", type=int)
  p.add_argument("--max_new_tokens", type=int)
  p.add_argument("--micro_batch", type=int, help="learner micro-batch rows (global)")
  p.add_argument("--remat", default=None, choices=REMAT_MODES, help="default: optim.remat or full")
  p.add_argument(
    "--attention",
    default=None,
    choices=ATTENTION_MODES,
    help="learner attention: dense holds [T, S] scores; flash (splash / blocked) does not"
    " (default: from model.attention of --config, else dense)",
  )
  p.add_argument(
    "--loop",
    default=None,
    choices=LOOPS,
    help="decode loop (rollout.loop; default: the config's, else lockstep): continuous holds"
    " --num_slots rows of KV, lockstep all rollout rows",
  )
  p.add_argument("--num_slots", type=int, default=None, help="continuous loop slots (global)")
  p.add_argument(
    "--kv_layout",
    default=None,
    choices=("auto", *KV_LAYOUTS),
    help="continuous loop KV layout (auto: paged on TPU chips, dense elsewhere)",
  )
  p.add_argument("--page_size", type=int, default=None, help="paged KV tokens per page")
  p.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZER_MOMENTS))
  p.add_argument("--param_dtype", default=None, choices=DTYPES, help="default: the preset's")
  p.add_argument("--compute_dtype", default=None, choices=DTYPES, help="default: the preset's")
  p.add_argument("--opt_state_dtype", default="float32", choices=DTYPES)
  p.add_argument("--no_master", action="store_true", help="no f32 master copy of bf16 params")
  p.add_argument("--reference", action="store_true", help="KL on: frozen reference params")
  p.add_argument(
    "--logprobs_pass",
    action="store_true",
    help="plan the learner's forward-only logprobs pass (on with --reference; from --config:"
    " rollout.recompute_old_logprobs)",
  )
  p.add_argument("--vocab_chunk", type=int, default=None, help="default: loss.vocab_chunk or 8192")
  p.add_argument(
    "--no_sampling_layout",
    action="store_true",
    help="the rollout reads the learner's FSDP params (no bf16 sampling copy)",
  )
  p.add_argument("--reserve", type=float, default=0.10)
  p.add_argument("--json", default=None, help="also write the plan as JSON to this path")
  p.set_defaults(model_shape={})  # preset overrides (hidden_size, num_layers) from --config
  return p


def load_run_config(args: argparse.Namespace):
  """The run config of `--config=path[:overrides]` with the `--set` overrides after them."""
  from egrc_jax.trainer.config import load_config_file

  path, _, arg = args.config.partition(":")
  return load_config_file(path, ",".join(a for a in (arg, args.set) if a) or None)


def config_values(c, num_chips: int) -> dict:
  """The plan's inputs that a run config sets (mesh.fsdp = -1 resolved over num_chips)."""
  mesh = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
  known = math.prod(v for v in mesh.values() if v != -1)
  given = ", ".join(f"mesh.{k}={v}" for k, v in mesh.items())
  if (-1 in mesh.values() and num_chips % known) or (
    -1 not in mesh.values() and known != num_chips
  ):
    raise ValueError(
      f"the config's mesh ({given}) does not fit {num_chips} chips: the axes other than -1 "
      f"multiply to {known}; pick a chip count they divide, or set mesh.* in the config"
    )
  mesh = {k: (num_chips // known if v == -1 else v) for k, v in mesh.items()}
  rows = c.data.prompts_per_step * c.rollout.num_samples
  buckets = SamplingConfig(prompt_buckets=tuple(c.rollout.prompt_buckets))
  return {
    "preset": c.model.preset,
    "model_shape": {k: v for k in ("hidden_size", "num_layers") if (v := c.model[k])},
    "mesh": ",".join(f"{k}:{v}" for k, v in mesh.items()),
    "rollout_batch": rows,
    "group_size": c.rollout.num_samples,
    "max_prompt": buckets.bucket(c.data.max_prompt_tokens),  # the compiled prompt length
    "max_new_tokens": c.rollout.max_new_tokens,
    "micro_batch": c.optim.micro_batch_rows or rows,
  }


def fill_from_config(args: argparse.Namespace, c=None) -> None:
  """Fill the flags left unset from a trainer config (`--config=path[:overrides]`, or `c`)."""
  c = load_run_config(args) if c is None else c
  for key, value in config_values(c, args.num_chips).items():
    if getattr(args, key) in (None, {}):
      setattr(args, key, value)
  args.reference = args.reference or c.loss.kl_kind != "none"
  from egrc_jax.trainer.plan import build_plan  # noqa: PLC0415

  recompute = any(s.recompute_old_logprobs for s in build_plan(c).stages)
  args.logprobs_pass = args.logprobs_pass or recompute
  args.vocab_chunk = args.vocab_chunk or c.loss.vocab_chunk
  if args.param_dtype is None and c.model.param_dtype:
    args.param_dtype = c.model.param_dtype
  if args.param_dtype == "float32":
    args.no_master = True  # float32 params are their own master copy
  if args.compute_dtype is None and c.model.dtype:
    args.compute_dtype = c.model.dtype
  if args.remat is None:
    args.remat = "full" if c.optim.remat else "none"
  if args.attention is None:
    args.attention = "dense" if c.model.attention == "dense" else "flash"
  r = c.rollout
  args.loop = args.loop or r.loop
  args.num_slots = args.num_slots or r.num_slots
  args.kv_layout = args.kv_layout or r.kv_layout
  args.page_size = args.page_size or r.page_size


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.compile:
    return compile_main(parser, args)
  try:
    plan = formula_plan(args)
  except ValueError as e:
    parser.error(str(e))
  print(plan.table())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(plan.to_dict(), f, indent=2)
  return 0


def formula_plan(args: argparse.Namespace):
  """The formula plan of the flags (and --config); raises ValueError on bad input."""
  if args.topology:
    spec = slice_spec(args.topology)
    args.chip = args.chip or spec.kind
    args.num_chips = args.num_chips or spec.chips
  if args.chip is None or args.num_chips is None:
    raise ValueError("set --chip and --num_chips (or --topology)")
  if args.config:
    fill_from_config(args)
  args.group_size = args.group_size or 8
  missing = [k for k in ("preset", "mesh", "rollout_batch", "max_prompt", "max_new_tokens",
                         "micro_batch") if getattr(args, k) is None]  # fmt: skip
  if missing:
    raise ValueError(f"set --{', --'.join(missing)} (or take them from --config)")
  cfg = get_preset(args.preset, **args.model_shape)
  mesh = parse_mesh(args.mesh, args.num_chips)
  if args.group_size < 1 or args.rollout_batch % args.group_size:
    raise ValueError(
      f"--rollout_batch={args.rollout_batch} must be a multiple of --group_size={args.group_size}"
    )
  seq = args.max_prompt + args.max_new_tokens
  plan = plan_memory(
    cfg,
    mesh,
    args.chip,
    rollout_rows=args.rollout_batch,
    cache_len=seq,
    micro_batch_rows=args.micro_batch,
    seq_len=seq,
    remat=args.remat or "full",
    optimizer=args.optimizer,
    param_dtype=args.param_dtype,
    opt_state_dtype=args.opt_state_dtype,
    reference=args.reference,
    logprobs_pass=args.logprobs_pass or args.reference,
    master_dtype=None if args.no_master else "float32",
    attention=args.attention or "dense",
    loop=args.loop or "lockstep",
    num_slots=args.num_slots or 0,
    kv_layout=_kv_layout(args.kv_layout or "auto", args.chip),
    page_size=args.page_size or 16,
    prefill_rows=args.rollout_batch // args.group_size,
    prompt_len=args.max_prompt,
    vocab_chunk=args.vocab_chunk or 8192,
    **({"compute_dtype": args.compute_dtype} if args.compute_dtype else {}),
    sampling_layout=not args.no_sampling_layout,
    reserve=args.reserve,
  )
  return plan


def _kv_layout(name: str, chip: str) -> str:
  """The KV layout the sampler runs on `chip` (`sampler.layouts.resolve_layout`)."""
  from egrc_jax.sampler.layouts import resolve_layout  # noqa: PLC0415

  platform = "gpu" if chip in ("H100", "H200") else "tpu"
  return resolve_layout(SamplingConfig(kv_layout=name), platform)


def compile_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  """--compile: every program of the run, compiled for --topology (exit 1: does not fit)."""
  from egrc_jax.plan.aot import compile_run
  from egrc_jax.plan.compare import compare_table

  if not (args.config and args.topology):
    parser.error("--compile needs --config=configs/<file>.py and --topology=<slice>")
  try:
    spec = slice_spec(args.topology)
    c = load_run_config(args)
    names = tuple(n.strip() for n in args.programs.split(",") if n.strip()) or None
    report = compile_run(c, spec, names, layout=args.layout, log=_log)
  except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
    parser.error(str(e))
  print(report.table())
  result = report.to_dict()
  if args.compare:
    table, rows = compare_table(c, report)
    print(table)
    result["compare"] = rows
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  for line in report.failures():
    print(f"error: {line}", file=sys.stderr)
  return 0 if report.fits else 1


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
