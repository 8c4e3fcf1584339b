"""Command line of the memory plan: `python -m egrc_jax.plan --help`."""

from __future__ import annotations

import argparse
import json
import math

from egrc_jax.model import get_preset
from egrc_jax.plan.memory import plan_memory
from egrc_jax.plan.settings import (
  ATTENTION_MODES,
  CHIP_HBM_GIB,
  DTYPES,
  OPTIMIZER_MOMENTS,
  REMAT_MODES,
)
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
  p = argparse.ArgumentParser(
    prog="python -m egrc_jax.plan", description="Per-device memory plan of an EGRC run."
  )
  p.add_argument(
    "--config",
    default=None,
    help="configs/<file>.py[:overrides]: take the preset, mesh, batch, lengths, micro-batch"
    " and KL setting from a run config (explicit flags win)",
  )
  p.add_argument("--preset", help="model preset, e.g. r1_distill_1p5b")
  p.add_argument("--chip", required=True, help=f"one of {sorted(CHIP_HBM_GIB)}")
  p.add_argument("--num_chips", type=int, required=True)
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
  p.add_argument("--remat", default="full", choices=REMAT_MODES)
  p.add_argument("--attention", default="dense", choices=ATTENTION_MODES)
  p.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZER_MOMENTS))
  p.add_argument("--param_dtype", default=None, choices=DTYPES, help="default: the preset's")
  p.add_argument("--opt_state_dtype", default="float32", choices=DTYPES)
  p.add_argument("--no_master", action="store_true", help="no f32 master copy of bf16 params")
  p.add_argument("--reference", action="store_true", help="KL on: frozen reference params")
  p.add_argument("--logits_chunk", type=int, default=2048)
  p.add_argument("--reserve", type=float, default=0.10)
  p.add_argument("--json", default=None, help="also write the plan as JSON to this path")
  return p


def fill_from_config(args: argparse.Namespace) -> None:
  """Fill the flags left unset from a trainer config (`--config=path[:overrides]`)."""
  from egrc_jax.trainer.config import load_config_file

  path, _, arg = args.config.partition(":")
  c = load_config_file(path, arg)
  mesh = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
  known = math.prod(v for v in mesh.values() if v != -1)
  mesh = {k: (args.num_chips // known if v == -1 else v) for k, v in mesh.items()}
  rows = c.data.prompts_per_step * c.rollout.num_samples
  derived = {
    "preset": c.model.preset,
    "mesh": ",".join(f"{k}:{v}" for k, v in mesh.items()),
    "rollout_batch": rows,
    "group_size": c.rollout.num_samples,
    "max_prompt": c.data.max_prompt_tokens,
    "max_new_tokens": c.rollout.max_new_tokens,
    "micro_batch": c.optim.micro_batch_rows or rows,
  }
  for key, value in derived.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.reference = args.reference or c.loss.kl_kind != "none"
  if args.param_dtype is None and c.model.param_dtype:
    args.param_dtype = c.model.param_dtype
  if args.param_dtype == "float32":
    args.no_master = True  # float32 params are their own master copy


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    if args.config:
      fill_from_config(args)
    args.group_size = args.group_size or 8
    missing = [k for k in ("preset", "mesh", "rollout_batch", "max_prompt", "max_new_tokens",
                           "micro_batch") if getattr(args, k) is None]  # fmt: skip
    if missing:
      raise ValueError(f"set --{', --'.join(missing)} (or take them from --config)")
    cfg = get_preset(args.preset)
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
      remat=args.remat,
      optimizer=args.optimizer,
      param_dtype=args.param_dtype,
      opt_state_dtype=args.opt_state_dtype,
      reference=args.reference,
      master_dtype=None if args.no_master else "float32",
      attention=args.attention,
      prefill_rows=args.rollout_batch // args.group_size,
      prompt_len=args.max_prompt,
      logits_chunk=args.logits_chunk,
      reserve=args.reserve,
    )
  except ValueError as e:
    parser.error(str(e))
  print(plan.table())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(plan.to_dict(), f, indent=2)
  return 0
