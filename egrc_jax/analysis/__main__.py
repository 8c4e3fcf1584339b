"""Entropy-conflict diagnostics and figures (PNG + CSV + JSON per command).

python -m egrc_jax.analysis transitions --original=EVAL_A --compressed=EVAL_B \\
    --benchmark=math500 --out=DIR
python -m egrc_jax.analysis entropy_grad --model=M --prompts=math500 --out=DIR
python -m egrc_jax.analysis high_entropy_tokens --samples=EVAL/samples.jsonl --out=DIR
python -m egrc_jax.analysis high_entropy_tokens --model=M --prompts=math500 --out=DIR
python -m egrc_jax.analysis selected_samples --samples=EVAL --out=DIR
python -m egrc_jax.analysis curves --workdir=RUN1 --workdir=RUN2 --out=DIR

Every flag is described in docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from egrc_jax import cli
from egrc_jax.analysis import curves, entropy_grad, high_entropy, sampling, selected
from egrc_jax.analysis import transitions as transitions_lib
from egrc_jax.data import benchmarks
from egrc_jax.sampler.config import DEFAULT_BUCKETS
from egrc_jax.trainer.config import CONNECTORS


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def _sampling_flags(p: argparse.ArgumentParser) -> None:
  a = p.add_argument
  a("--model", default="", help="HF directory, trainer workdir or checkpoint step directory")
  a("--tokenizer", default="", help="tokenizer directory (default: the model's)")
  a("--prompts", default="math500", help="benchmark name or JSONL file of problems")
  a("--data_root", default=benchmarks.DEFAULT_DATA_ROOT)
  a("--n", type=int, default=8, help="samples per prompt (the group size G)")
  a("--temperature", type=float, default=0.6)
  a("--top_p", type=float, default=1.0)
  a("--max_new_tokens", type=int, default=1024)
  a("--limit", type=int, default=8, help="number of prompts")
  a("--seed", type=int, default=0)
  a("--prompt_buckets", type=_ints, default=DEFAULT_BUCKETS)
  a("--grader_workers", type=int, default=1)
  a("--instruction", default=None,
    help="appended to each problem (default: the trainer run's data.instruction, or the "
    "standard math instruction for a plain HF model); '' for none")  # fmt: skip


def _settings(args) -> sampling.SampleSettings:
  return sampling.SampleSettings(
    n=args.n, temperature=args.temperature, top_p=args.top_p,
    max_new_tokens=args.max_new_tokens, limit=args.limit, seed=args.seed,
    prompt_buckets=args.prompt_buckets, grader_workers=args.grader_workers,
    instruction=args.instruction,
  )  # fmt: skip


def parser() -> cli.Parser:
  p = cli.Parser(prog="python -m egrc_jax.analysis", description=__doc__)
  sub = p.add_subparsers(dest="kind", required=True)

  t = sub.add_parser("transitions", help="original vs compressed correctness (Fig. 4)")
  t.add_argument("--original", required=True, help="evaluation workdir (or samples.jsonl) A")
  t.add_argument("--compressed", required=True, help="evaluation workdir (or samples.jsonl) B")
  t.add_argument("--benchmark", default="math500")
  t.add_argument("--threshold", type=float, default=0.5, help="solved: mean accuracy >= this")
  t.add_argument("--out", required=True)

  e = sub.add_parser("entropy_grad", help="entropy vs logit-gradient norm (Fig. 3d)")
  _sampling_flags(e)
  e.add_argument("--advantage", default="grpo", choices=entropy_grad.ADVANTAGES)
  e.add_argument("--r", type=float, default=0.5, help="f(L) = r of the stage-1 reward")
  e.add_argument("--out", required=True)

  h = sub.add_parser("high_entropy_tokens", help="frequent high-entropy strings (Fig. 3e)")
  h.add_argument("--samples", default="", help="evaluation samples (--save_token_entropy)")
  h.add_argument("--benchmark", default="", help="only this benchmark's samples")
  _sampling_flags(h)
  h.add_argument("--rho", type=float, default=0.2, help="top-rho entropy fraction")
  h.add_argument("--connectors", default=",".join(CONNECTORS))
  h.add_argument("--out", required=True)

  s = sub.add_parser("selected_samples", help="samples each objective rewards (Fig. 3a)")
  s.add_argument("--samples", required=True, help="evaluation workdir or samples.jsonl")
  s.add_argument("--benchmark", default="", help="only this benchmark's samples")
  s.add_argument("--max_len", type=int, default=0, help="L (default: eval max_new_tokens)")
  s.add_argument("--r", type=float, default=0.5, help="f(L) = r")
  s.add_argument("--weight", default="reward", choices=selected.WEIGHTS)
  s.add_argument("--out", required=True)

  c = sub.add_parser("curves", help="entropy / length / accuracy per step of trainer runs")
  c.add_argument("--workdir", action="append", required=True, help="trainer workdir (repeat)")
  c.add_argument("--label", action="append", default=None, help="legend label per --workdir")
  c.add_argument("--out", required=True)
  return p


def run(args: argparse.Namespace) -> dict:
  if args.kind == "transitions":
    return transitions_lib.run(args.original, args.compressed, args.benchmark, args.out,
                               args.threshold)  # fmt: skip
  if args.kind == "entropy_grad":
    if not args.model:
      raise ValueError("entropy_grad needs --model (an HF directory or a trainer workdir)")
    return entropy_grad.run(args.model, args.prompts, args.out, _settings(args), args.data_root,
                            args.advantage, args.r, args.tokenizer)  # fmt: skip
  if args.kind == "high_entropy_tokens":
    conns = tuple(w.strip().lower() for w in args.connectors.split(",") if w.strip())
    if bool(args.samples) == bool(args.model):
      raise ValueError(
        "high_entropy_tokens needs exactly one of --samples (an evaluation) or --model"
      )
    if args.samples:
      return high_entropy.run_samples(args.samples, args.tokenizer, args.out, args.rho, conns,
                                      args.benchmark or None)  # fmt: skip
    return high_entropy.run_model(args.model, args.prompts, args.out, args.rho, conns,
                                  _settings(args), args.data_root, args.tokenizer)  # fmt: skip
  if args.kind == "selected_samples":
    return selected.run(args.samples, args.out, args.max_len, args.r, args.weight,
                        args.benchmark or None)  # fmt: skip
  return curves.run(args.workdir, args.out, args.label)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  summary = run(parser().parse_args(argv))
  brief = {k: v for k, v in summary.items() if k != "counts"}
  print(json.dumps(brief, indent=1, default=str)[:4000], flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
