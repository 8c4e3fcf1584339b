"""The formula plan (`memory.py`) against the compiler (`aot.py`), program by program.

    python -m egrc_jax.plan --config=configs/r1_distill_1p5b.py --topology=v4-32 --compile --compare

Both sides count per-device bytes of the whole step at that moment: the formula's `state +
the program's terms` against the compiler's `program bytes + resident`. docs/memory_plan.md
keeps the table this prints for the shipped configs; rerun it after a model or trainer change.
"""

from __future__ import annotations

from egrc_jax.plan.aot import GIB, RunReport
from egrc_jax.plan.settings import MemoryPlan

TOLERANCE = 0.15  # the formula should be within 15% of the compiler


def formula_plan_for(c, report: RunReport, *, rows=None, group=None, sampling=True) -> MemoryPlan:
  """The formula plan of run config `c` on the report's slice (rows/group: e.g. the eval's)."""
  from egrc_jax.plan.cli import _parser, fill_from_config, formula_plan

  argv = [f"--topology={report.spec.name}"]
  if rows is not None:
    argv += [f"--rollout_batch={rows}", f"--group_size={group}"]
  if not sampling:
    argv.append("--no_sampling_layout")
  args = _parser().parse_args(argv)
  args.chip, args.num_chips = report.spec.kind, report.spec.chips
  fill_from_config(args, c)
  return formula_plan(args)


def _formula_programs(c, report: RunReport) -> dict[str, int | str]:
  sampling = report.layout == "sampling"
  out: dict[str, int | str] = dict(formula_plan_for(c, report, sampling=sampling).program_bytes())
  from egrc_jax.trainer.plan import build_plan  # noqa: PLC0415

  ev = build_plan(c).eval
  rows, group = ev.prompts_per_call * ev.num_samples, ev.num_samples
  names = ("prefill", "reshard", "decode")
  try:
    ev = formula_plan_for(c, report, rows=rows, group=group, sampling=sampling).program_bytes()
    out.update({f"eval_{n}": ev[n] for n in names if n in ev})
  except ValueError:  # rows that do not split over data x fsdp: the compiler replicates them
    out.update({f"eval_{n}": "n/a (rows do not split over data x fsdp)" for n in names})
  return out


def compare_table(c, report: RunReport) -> tuple[str, list[dict]]:
  """(markdown table, rows as dicts) of formula vs compiler per compiled program."""
  formula = _formula_programs(c, report)
  lines = [
    f"formula vs compiler on {report.spec.name} (GiB per device; within {TOLERANCE:.0%} = agrees)",
    "| program | formula | compiler | formula / compiler - 1 | agrees |",
    "|---|---|---|---|---|",
  ]
  rows = []
  for p in report.programs:
    f = formula.get("train" if p.name.startswith("train") else p.name)
    if isinstance(f, int):
      diff = f / p.required - 1
      agrees = abs(diff) <= TOLERANCE
      lines.append(
        f"| {p.name} | {f / GIB:.2f} | {p.required / GIB:.2f}{' (refused)' if p.error else ''}"
        f" | {diff:+.1%} | {'yes' if agrees else '**no**'} |"
      )
      rows.append(dict(program=p.name, formula=f, compiler=p.required, diff=diff, agrees=agrees))
    else:
      lines.append(f"| {p.name} | {f or 'no term'} | {p.required / GIB:.2f} | | |")
      rows.append(dict(program=p.name, formula=f, compiler=p.required, diff=None, agrees=None))
  return "\n".join(lines), rows
