"""The toy task's prompt sets as JSONL benchmark files.

    python -m egrc_jax.toy.data --out DIR [--num_train 20000 --num_test 500 --seed 0]

writes DIR/train.jsonl and DIR/test.jsonl, one {"id", "problem", "answer"} row per problem
("answer" an integer string, as in aime24's file), so the RL pipeline reads them like any
benchmark file with problem field "problem" and answer field "answer".
"""

from __future__ import annotations

import argparse
import json
import pathlib

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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_train", type=int, default=20_000)
  parser.add_argument("--num_test", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  train, test = task_lib.make_splits(
    task_lib.TaskConfig(), args.num_train, args.num_test, args.seed
  )
  paths = write_splits(args.out, train, test)
  for split, path in paths.items():
    print(f"{split}: {path} ({len(train if split == 'train' else test)} problems)")


if __name__ == "__main__":
  main()
