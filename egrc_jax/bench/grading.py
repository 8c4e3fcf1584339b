"""Grader throughput: responses graded per second by a GraderPool on MATH500-like responses.

  python -m egrc_jax.bench.grading [--workers 2] [--n 500] [--timeout_s 5]

Responses are R1-style ("<think>...</think> ... \\boxed{answer}") built from the MATH500 golds
(../shared/data): half verbatim, a quarter rewritten in an equivalent form (\\dfrac, spacing,
`x =` prefix) and a quarter perturbed (last integer + 1), so the fast path, math-verify and near
misses are all exercised. Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import time

from egrc_jax import cli
from egrc_jax.data.gold import gold_answer
from egrc_jax.grading import GraderPool, grade_responses

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def make_responses(golds: list[str]) -> list[str]:
  """One response per gold: verbatim, equivalent rewrite or perturbed, in rotation."""
  out = []
  for i, g in enumerate(golds):
    if i % 4 == 1:
      ans = "x = " + g.replace("\\frac", "\\dfrac").replace(",", ", ")
    elif i % 4 == 3:
      m = list(re.finditer(r"\d+", g))
      ans = g[: m[-1].start()] + str(int(m[-1].group()) + 1) + g[m[-1].end() :] if m else g + "+1"
    else:
      ans = g
    think = f"<think>\nReasoning about the problem... step {i}.\n</think>"
    out.append(f"{think}\n\nThe answer is $\\boxed{{{ans}}}$.")
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = cli.Parser(prog="python -m egrc_jax.bench.grading", description=__doc__)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--n", type=int, default=500)
  parser.add_argument("--timeout_s", type=float, default=5.0)
  parser.add_argument("--data", type=pathlib.Path, default=DATA)
  args = parser.parse_args(argv)
  path = args.data / "benchmarks/math500/test.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: pass --data=<the folder holding benchmarks/>")
  rows = [json.loads(line) for line in path.open()]
  golds = [gold_answer("math500", r) for r in rows][: args.n]
  responses = make_responses(golds)
  t0 = time.perf_counter()
  with GraderPool(num_workers=args.workers, timeout_s=args.timeout_s) as pool:
    t1 = time.perf_counter()
    grade_responses(responses[:4], golds[:4], pool)  # workers ready and warm
    t2 = time.perf_counter()
    results = grade_responses(responses, golds, pool)
    t3 = time.perf_counter()
  statuses = {s: sum(r.status == s for r in results) for s in {r.status for r in results}}
  report = {
    "workers": args.workers,
    "responses": len(results),
    "startup_s": round(t2 - t0, 2),
    "grade_s": round(t3 - t2, 2),
    "responses_per_s": round(len(results) / (t3 - t2), 1),
    "correct_fraction": round(sum(r.correct for r in results) / len(results), 3),
    "statuses": statuses,
    "pool_construct_s": round(t1 - t0, 3),
  }
  print(f"{'metric':<18} value")
  for k, v in report.items():
    print(f"{k:<18} {v}")
  print(json.dumps(report))
  return report


if __name__ == "__main__":
  sys.exit(cli.run(main))
