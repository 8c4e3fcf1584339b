"""Training curves from trainer workdirs: entropy, length and accuracy per step, with the
stage switches as vertical lines and several runs overlaid.

metrics.jsonl holds one JSON object per step ({"step", "stage", "entropy/mean",
"entropy/at_temperature", "length/mean", "accuracy", ...}) and event rows {"step", "event"}; a stage
switch is an event that `trainer.metrics.is_stage_begin` recognises ("stage X begins"). A
partial last line is skipped.
"""

from __future__ import annotations

import json
import pathlib

from egrc_jax.analysis import common
from egrc_jax.trainer.metrics import is_stage_begin

METRICS = (("entropy/mean", "policy entropy (T = 1)"),
           ("entropy/at_temperature", "entropy at the sampling temperature"),
           ("length/mean", "mean length (tokens)"), ("accuracy", "accuracy"))  # fmt: skip


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(step rows, event rows) of a run's metrics.jsonl."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: pass a trainer --workdir")
  rows, events = [], []
  for line in path.read_text(encoding="utf-8").splitlines():
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line the trainer was writing when it stopped
    (events if "event" in obj else rows).append(obj)
  return rows, events


def stage_switches(events: list[dict]) -> list[tuple[int, str]]:
  """(step, event text) of every stage switch."""
  return [(int(e["step"]), str(e["event"])) for e in events if is_stage_begin(e["event"])]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(int(r["step"]), float(r[key])) for r in rows
         if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]  # fmt: skip
  return [p[0] for p in pts], [p[1] for p in pts]


def run(workdirs: list[str], out: str, labels: list[str] | None = None) -> dict:
  """Write curves.png, curves.csv (step, run, metric values) and curves.json (switches)."""
  if not workdirs:
    raise ValueError("pass at least one --workdir")
  labels = labels or [pathlib.Path(w).name for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs; give one per run")
  runs = [read_metrics(wd) for wd in workdirs]  # every input read before --out is created
  d = common.out_dir(out)
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
  csv_rows, summary = [], {"runs": {}}
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (wd, label, (rows, events)) in enumerate(zip(workdirs, labels, runs, strict=True)):
    switches = stage_switches(events)
    color = colors[i % len(colors)]
    for ax, (key, title) in zip(axes, METRICS, strict=True):
      x, y = series(rows, key)
      ax.plot(x, y, color=color, label=label)
      for step, _ in switches:
        ax.axvline(step, color=color, linestyle="--", alpha=0.7)
      ax.set_title(title)
      ax.set_xlabel("step")
    for r in rows:
      csv_rows.append({"run": label, "step": r["step"], "stage": r.get("stage"),
                       **{k: r.get(k) for k, _ in METRICS}})  # fmt: skip
    summary["runs"][label] = {
      # Steps, not rows: an evaluation row shares the number of the step it follows.
      "workdir": str(wd), "steps": len({r["step"] for r in rows}),
      "stage_switches": [{"step": s, "event": e} for s, e in switches],
    }  # fmt: skip
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(d / "curves.png", dpi=110)
  plt.close(fig)
  common.write_csv(d / "curves.csv", csv_rows)
  common.write_json(d / "curves.json", summary)
  return summary
