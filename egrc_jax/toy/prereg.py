"""The pre-registered predictions of docs/toy_conflict.md, checked against a pipeline report.

    python -m egrc_jax.toy.prereg --report=runs/conflict_heldout/report.json [--out=FILE.md]

Prints one row per prediction (met or not, with the numbers it was read from) and the verdict
on the paper's ordering claim, as Markdown. Each check is the sentence of docs/toy_conflict.md
("Predictions for seeds 3-5") written as code; this module was committed before any held-out
result was read, so a reader can see that the rules were not fitted to the outcome.

"Beyond the band" is the report's rule (`report.accuracy_tolerance`): two binomial standard
errors of a difference of accuracies, n = problems x seeds for a mean over seeds, n =
problems for one seed. Lengths compare as ratios to each seed's SFT length (the table's).
The ordering claim holds against an arm X (reverse order, EE, EE*) when EGRC is more accurate
than X beyond the band: the page's reading of predictions 3 and 4 ("it beats the reversed
order and loses to EE"); the report's accuracy-and-length comparison is printed next to it.
"""

from __future__ import annotations

import json
import pathlib
import sys

from egrc_jax import cli
from egrc_jax.toy import report

NEEDED = ("sft", "compress_only", "egrc", "ee", "ee_star", "reverse")


def _band(acc_a: float, acc_b: float, n: int) -> float:
  """The report's noise band of a difference of two accuracies, each over n samples."""
  return report.accuracy_tolerance((acc_a + acc_b) / 2, n)


def _check(name: str, met: bool, text: str) -> dict:
  return {"prediction": name, "met": bool(met), "text": text}


def evaluate(rep: dict) -> dict:
  """Every prediction of docs/toy_conflict.md against `rep` (a report.json)."""
  tab, seeds = rep["table"], rep["seeds"]
  missing = [m for m in NEEDED if m not in tab]
  if missing:
    raise ValueError(
      f"the report has no {', '.join(missing)}: run the pipeline with "
      "--config=configs/toy.py:conflict (every arm)"
    )
  per_seed_n = rep["settings"]["num_test"]
  n = per_seed_n * len(seeds)
  acc = {m: tab[m]["accuracy"]["mean"] for m in NEEDED}
  ratio = {m: tab[m]["length_ratio"]["mean"] for m in NEEDED}

  def band(a: str, b: str) -> float:
    return _band(acc[a], acc[b], n)

  def diff(a: str, b: str) -> float:
    return acc[a] - acc[b]

  def fmt(a: str, b: str) -> str:
    return f"{report.LABEL[a]} - {report.LABEL[b]} = {diff(a, b):+.3f} (band +-{band(a, b):.3f})"

  out = []
  # 1. Compression costs accuracy: on the mean and on each seed, and the size.
  each = []
  for s in seeds.values():
    co, sft = s["eval"]["compress_only"]["accuracy"], s["eval"]["sft"]["accuracy"]
    each.append((s["seed"], co - sft, _band(co, sft, per_seed_n)))
  met = diff("compress_only", "sft") < -band("compress_only", "sft") and all(
    d < -t for _, d, t in each
  )
  seeds_text = ", ".join(f"seed {k}: {d:+.3f} (+-{t:.3f})" for k, d, t in each)
  out.append(_check("1. compress-only below SFT beyond the band, mean and each seed", met,
                    f"{fmt('compress_only', 'sft')}; {seeds_text}"))  # fmt: skip
  d = diff("compress_only", "sft")
  out.append(_check("1. compress-only - SFT in [-0.30, -0.08] (predicted -0.18)",
                    -0.30 <= d <= -0.08, f"{d:+.3f}"))  # fmt: skip
  # 2. EGRC recovers part of it.
  out.append(_check("2. EGRC above compress-only beyond the band",
                    diff("egrc", "compress_only") > band("egrc", "compress_only"),
                    fmt("egrc", "compress_only")))  # fmt: skip
  d = diff("egrc", "sft")
  out.append(_check("2. EGRC - SFT in [-0.12, +0.03] (predicted -0.05)", -0.12 <= d <= 0.03,
                    f"{d:+.3f}"))  # fmt: skip
  out.append(_check("2. EGRC length ratio <= 0.5", ratio["egrc"] <= 0.5,
                    f"{ratio['egrc']:.3f}"))  # fmt: skip
  # 3. Stage order.
  out.append(_check("3. EGRC above reverse order beyond the band",
                    diff("egrc", "reverse") > band("egrc", "reverse"),
                    fmt("egrc", "reverse")))  # fmt: skip
  d = diff("egrc", "reverse")
  out.append(_check("3. EGRC - reverse in [+0.03, +0.15] (predicted +0.08)", 0.03 <= d <= 0.15,
                    f"{d:+.3f}"))  # fmt: skip
  out.append(_check("3. reverse order shorter than EGRC", ratio["reverse"] < ratio["egrc"],
                    f"length ratio {ratio['reverse']:.3f} vs {ratio['egrc']:.3f}"))  # fmt: skip
  # 4. EGRC against EE: predicted NOT to hold.
  out.append(_check("4. EE at least as accurate as EGRC (within or above the band)",
                    diff("ee", "egrc") >= -band("ee", "egrc"), fmt("ee", "egrc")))  # fmt: skip
  d = diff("ee", "egrc")
  out.append(_check("4. EE - EGRC in [+0.03, +0.20] (predicted +0.10)", 0.03 <= d <= 0.20,
                    f"{d:+.3f}"))  # fmt: skip
  out.append(_check("4. EE longer than EGRC", ratio["ee"] > ratio["egrc"],
                    f"length ratio {ratio['ee']:.3f} vs {ratio['egrc']:.3f}"))  # fmt: skip
  out.append(_check("4. EE more accurate than SFT", acc["ee"] > acc["sft"], fmt("ee", "sft")))
  # 5. EE*.
  out.append(_check("5. EE* within EE's band", abs(diff("ee_star", "ee")) <= band("ee_star", "ee"),
                    fmt("ee_star", "ee")))  # fmt: skip
  out.append(_check("5. EE* shorter than EE", ratio["ee_star"] < ratio["ee"],
                    f"length ratio {ratio['ee_star']:.3f} vs {ratio['ee']:.3f}"))  # fmt: skip
  # 6. Diagnostics at the SFT model, on each seed.
  diag = [(s["seed"], s["conflict"]) for s in seeds.values() if "conflict" in s]
  if len(diag) != len(seeds):
    raise ValueError("the report lacks the entropy-conflict diagnostics of some seed: run with "
                     "pipeline.conflict_prompts > 0 (the conflict preset has 100)")  # fmt: skip
  r_text = ", ".join(f"seed {k}: {d['length_correct_r']:+.3f}" for k, d in diag)
  out.append(_check("6. r(length, correct) < 0 on each seed",
                    all(d["length_correct_r"] < 0 for _, d in diag), r_text))  # fmt: skip

  def objs(key: str, f: str) -> str:
    return ", ".join(
      f"seed {k}: {format(d['objectives']['compression'][key], f)} / "
      f"{format(d['objectives']['accuracy'][key], f)}"
      for k, d in diag
    )

  out.append(_check(
    "6. s < 0 under both objectives on each seed (compression / accuracy)",
    all(o["connector_grad_mean"] < 0 for _, d in diag for o in d["objectives"].values()),
    objs("connector_grad_mean", "+.5f"),
  ))  # fmt: skip
  out.append(_check(
    "6. r(H, g) > 0 under both, larger under accuracy, on each seed (compression / accuracy)",
    all(
      0 < d["objectives"]["compression"]["pearson_r"] < d["objectives"]["accuracy"]["pearson_r"]
      for _, d in diag
    ),
    objs("pearson_r", ".3f"),
  ))  # fmt: skip
  # The ordering claim, read as the page says (from predictions 3 and 4): against an arm X it
  # holds when EGRC is more accurate than X beyond the band; the report's two-dimensional
  # comparison (accuracy and length) is printed next to it.
  comps = {c["arm"]: c for c in report.comparisons(tab, len(seeds), per_seed_n)}
  against = {
    arm: {"held": diff("egrc", arm) > band("egrc", arm), "accuracy": fmt("egrc", arm),
          "comparison": comps[arm]["text"]}
    for arm in ("reverse", "ee", "ee_star")
  }  # fmt: skip
  return {
    "checks": out,
    "claim": {"against": against, "held": all(v["held"] for v in against.values())},
  }


def markdown(result: dict) -> str:
  lines = ["| prediction | outcome | numbers |", "| --- | --- | --- |"]
  for c in result["checks"]:
    lines.append(f"| {c['prediction']} | {'met' if c['met'] else 'NOT met'} | {c['text']} |")
  met = sum(c["met"] for c in result["checks"])
  lines += ["", f"{met} of {len(result['checks'])} predictions met.", ""]
  claim = result["claim"]
  for arm, v in claim["against"].items():
    lines.append(
      f"- against {report.LABEL[arm]}: {'held' if v['held'] else 'did NOT hold'}: "
      f"{v['accuracy']}. The report's comparison: {v['comparison']}"
    )
  lines += [
    "",
    "**The ordering claim (EGRC more accurate than the reversed order and than the entangled "
    "objective, EE and EE*, beyond the band) "
    f"{'held' if claim['held'] else 'did not hold'} on these seeds.**",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  parser = cli.Parser(prog="python -m egrc_jax.toy.prereg", description=__doc__)
  parser.add_argument("--report", required=True, help="a toy pipeline's report.json")
  parser.add_argument("--out", default="", help="also write the Markdown here")
  args = parser.parse_args(argv)
  path = pathlib.Path(args.report)
  if not path.is_file():
    raise cli.UserError(f"--report={path}: no such file; run `python -m egrc_jax.toy.pipeline "
                        "--config=configs/toy.py:conflict ...` first")  # fmt: skip
  text = markdown(evaluate(json.loads(path.read_text())))
  print(text, end="")
  if args.out:
    pathlib.Path(args.out).write_text(text)
  return text


if __name__ == "__main__":
  sys.exit(cli.run(main))
