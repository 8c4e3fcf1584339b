"""Evaluate a model on the math benchmarks (pass@1, lengths, truncation, length ratio).

python -m egrc_jax.evaluate --model=<HF dir | trainer workdir | checkpoint step dir> \\
  --workdir=<out dir> [--benchmarks=aime24,amc23,math500,minerva_math,olympiadbench,gsm8k] \\
  [--n=16] [--temperature=0.6] [--top_p=0.95] [--max_new_tokens=32768] [--limit=K] \\
  [--batch_prompts=8] [--baseline=<results.json>] [--data_root=../shared/data] \\
  [--mesh=1,-1,1] [--grader_workers=2]

Every flag is described in docs/evaluate.md. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from egrc_jax import cli
from egrc_jax.data import benchmarks, chat
from egrc_jax.evaluate.runner import EvalConfig, evaluate
from egrc_jax.sampler.config import DEFAULT_BUCKETS


def int_tuple(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def mesh_shape(text: str) -> tuple[int, int, int] | None:
  if not text:
    return None
  shape = int_tuple(text)
  if len(shape) != 3:
    raise argparse.ArgumentTypeError(f"--mesh={text!r}: give data,fsdp,tensor, e.g. 1,-1,1")
  return shape  # type: ignore[return-value]


def parser() -> cli.Parser:
  p = cli.Parser(prog="python -m egrc_jax.evaluate", description=__doc__)
  a = p.add_argument
  a("--model", required=True, help="HF directory, trainer workdir or checkpoint step directory")
  a("--workdir", required=True, help="output directory (samples.jsonl, results.json/.md)")
  a("--benchmarks", default=",".join(benchmarks.EVAL_BENCHMARKS), help="comma-separated names")
  a("--n", type=int, default=16, help="samples per problem")
  a("--temperature", type=float, default=0.6)
  a("--top_p", type=float, default=0.95)
  a("--top_k", type=int, default=0, help="0: off")
  a("--greedy", action="store_true", help="argmax decoding (needs --n=1)")
  a("--max_new_tokens", type=int, default=32768)
  a("--limit", type=int, default=0, help="first K problems per benchmark (0: all)")
  a("--batch_prompts", type=int, default=8, help="prompts per sampler call")
  a("--baseline", default="", help="results.json of the original model (length ratio)")
  a("--data_root", default=benchmarks.DEFAULT_DATA_ROOT)
  a("--mesh", type=mesh_shape, default=None, help="data,fsdp,tensor (default: one device)")
  a("--grader_workers", type=int, default=2)
  a("--grader_timeout_s", type=float, default=5.0)
  a("--seed", type=int, default=0)
  a("--instruction", default=chat.INSTRUCTION)
  a("--system_prompt", default="")
  a("--tokenizer", default="", help="tokenizer directory (default: the model's)")
  a("--save_token_entropy", action="store_true", help="store token ids + entropies per sample")
  a("--prompt_buckets", type=int_tuple, default=DEFAULT_BUCKETS)
  a("--loop", default="continuous", choices=("continuous", "lockstep"), help="decode loop")
  a("--num_slots", type=int, default=64, help="continuous loop: rows decoded at once")
  a("--param_dtype", default="", choices=("", "float32", "bfloat16"))
  a("--dtype", default="", choices=("", "float32", "bfloat16"))
  return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
  d = dict(vars(args))
  d["benchmarks"] = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
  return EvalConfig(**d)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from egrc_jax import distributed

  distributed.maybe_initialize()  # multi-host: before any JAX computation
  evaluate(config_from_args(parser().parse_args(argv)))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
