"""Branch a run at one of its checkpoints: a new workdir that resumes from that step.

    python -m egrc_jax.trainer.branch --source=RUN_DIR --step=N --dest=NEW_DIR
    python -m egrc_jax.main --config=<the run's config>:<changed keys> --workdir=NEW_DIR

The second command resumes at step N with whatever settings it is given: for example
several stage-2 variants (temperature, reward weights, clipping) from one stage-1 run, without
paying for stage 1 again. With unchanged settings the branch continues exactly as the source
run did (resume is bitwise exact). The stage layout must stay the same (same arm and stage
names); the trainer refuses a checkpoint of another layout or model shape.

Copied into NEW_DIR: checkpoints/N (whole), config.json, and the metrics.jsonl rows up to
step N, less the events of step N that the resumed run writes again itself ("stage ...
begins" at a stage boundary, with the new settings, and "run finished"), plus one event
"branched from RUN_DIR at step N". Not copied: later checkpoints and rows, tb/, hf_final/,
results.json. RUN_DIR is only read.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

from egrc_jax import cli
from egrc_jax.trainer.metrics import RUN_FINISHED, is_stage_begin

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


class BranchError(ValueError):
  pass


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints of a run (orbax writes commit_success.txt last)."""
  d = run_dir / CHECKPOINTS
  if not d.is_dir():
    return []
  return sorted(
    int(p.name)
    for p in d.iterdir()
    if p.name.isdigit() and (p / "commit_success.txt").is_file() and (p / "state").is_dir()
  )


def _rewritten_event(row: dict) -> bool:
  """An event that the resumed run writes again itself at the branch step."""
  return is_stage_begin(row["event"]) or row["event"] == RUN_FINISHED


def branch_metrics(lines: list[str], step: int) -> list[str]:
  """The metrics.jsonl lines a branch at `step` keeps (see the module docstring). A line the
  source was writing when it stopped (not JSON) is dropped."""
  out = []
  for line in lines:
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    s = int(row.get("step", 0))
    if s > step or (s == step and "event" in row and _rewritten_event(row)):
      continue
    out.append(line if line.endswith("\n") else line + "\n")
  return out


def branch(source, step: int, dest) -> pathlib.Path:
  """Create `dest` as a branch of the run in `source` at checkpoint `step`; returns dest."""
  if "://" in f"{source}{dest}":
    raise BranchError(
      "branch works on local directories; for a gs:// run copy checkpoints/<step>, "
      "config.json and metrics.jsonl to a local directory first (or branch there with gsutil "
      "by the same recipe: docs/trainer.md)"
    )
  source, dest = pathlib.Path(source), pathlib.Path(dest)
  if not source.is_dir():
    raise BranchError(f"--source {source} is not a directory: pass a trainer --workdir")
  steps = checkpoint_steps(source)
  if not steps:
    raise BranchError(
      f"{source / CHECKPOINTS} holds no complete checkpoint: pass the --workdir of a run "
      "that saved one (checkpoint.every, or a stage end)"
    )
  if step not in steps:
    raise BranchError(
      f"no complete checkpoint at step {step} in {source / CHECKPOINTS}; available: {steps}"
    )
  if dest.resolve() == source.resolve():
    raise BranchError("--dest must differ from --source (the source run is only read)")
  if dest.exists() and any(dest.iterdir()):
    raise BranchError(
      f"--dest {dest} exists and is not empty: pick a new directory (nothing was written)"
    )
  tmp = dest.with_name(dest.name + ".branch-tmp")
  if tmp.exists():
    shutil.rmtree(tmp)
  (tmp / CHECKPOINTS).mkdir(parents=True)
  shutil.copytree(source / CHECKPOINTS / str(step), tmp / CHECKPOINTS / str(step))
  if (source / "config.json").is_file():
    shutil.copy2(source / "config.json", tmp / "config.json")
  metrics = source / METRICS
  lines = metrics.read_text(encoding="utf-8").splitlines(True) if metrics.is_file() else []
  kept = branch_metrics(lines, step)
  event = {"step": step, "event": f"branched from {source.resolve()} at step {step}"}
  (tmp / METRICS).write_text("".join(kept) + json.dumps(event) + "\n", encoding="utf-8")
  # Complete before it becomes visible: a half-copied branch never looks like a run.
  if dest.exists():
    dest.rmdir()
  tmp.rename(dest)
  return dest


def main(argv=None) -> int:
  parser = cli.Parser(
    prog="python -m egrc_jax.trainer.branch",
    description="Branch a trainer run at one of its checkpoints (see the module docstring).",
  )
  parser.add_argument("--source", required=True, help="the run's --workdir (only read)")
  parser.add_argument("--step", required=True, type=int, help="a checkpointed global step")
  parser.add_argument("--dest", required=True, help="a new, empty directory")
  args = parser.parse_args(argv)
  out = branch(args.source, args.step, args.dest)
  print(
    f"branched {args.source} at step {args.step} into {out}; resume with\n"
    f"  python -m egrc_jax.main --config=<config>:<changed keys> --workdir={out}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
