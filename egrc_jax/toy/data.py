"""The toy task's prompt sets as JSONL benchmark files.

    python -m egrc_jax.toy.data --out=DIR [--seed=S] \\
        [--config=configs/toy.py:sft.num_train=N,eval.num_prompts=M]

writes DIR/train.jsonl and DIR/test.jsonl, one {"id", "problem", "answer"} row per problem
("answer" an integer string, as in aime24's file), so the RL pipeline reads them like any
benchmark file with problem field "problem" and answer field "answer".
"""

from __future__ import annotations

import json
import pathlib
import sys

from egrc_jax import cli
from egrc_jax.toy import task as task_lib


def rows(problems: list[task_lib.Problem]) -> list[dict]:
  return [{"id": p.id, "problem": p.text, "answer": str(p.answer)} for p in problems]


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def write_splits(out_dir, train, test) -> dict[str, pathlib.Path]:
  """DIR/train.jsonl and DIR/test.jsonl; returns {split: path}."""
  out = pathlib.Path(out_dir)
  paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
  write_jsonl(paths["train"], rows(train))
  write_jsonl(paths["test"], rows(test))
  return paths


def main(argv=None) -> int:
  from egrc_jax.toy.plan import plan_of, toy_parser

  parser = toy_parser("python -m egrc_jax.toy.data", __doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  plan = plan_of(args)
  train, test = task_lib.make_splits(plan.task, plan.sft.num_train, plan.num_test, args.seed)
  paths = write_splits(args.out, train, test)
  for split, path in paths.items():
    print(f"{split}: {path} ({len(train if split == 'train' else test)} problems)")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
