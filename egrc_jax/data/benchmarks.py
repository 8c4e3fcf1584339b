"""The six evaluation benchmarks and the RL training file, by name, under a data root.

The data root defaults to `../shared/data` relative to the current directory (the repository
root when run from it; see ../shared/data/README.md). Users with their own copies pass
`data_root`, or point `DataConfig.source` at any JSONL/Parquet/array_record/`hf:` source.
"""

from __future__ import annotations

import pathlib

from egrc_jax.data.sources import Examples, read_examples

DEFAULT_DATA_ROOT = "../shared/data"

# name -> (path under the data root, gold rule in egrc_jax.data.gold)
BENCHMARK_FILES: dict[str, tuple[str, str]] = {
  "aime24": ("benchmarks/aime24/test.jsonl", "aime24"),
  "amc23": ("benchmarks/amc23/test.jsonl", "amc23"),
  "math500": ("benchmarks/math500/test.jsonl", "math500"),
  "minerva_math": ("benchmarks/minerva_math/test.jsonl", "minerva_math"),
  "olympiadbench": ("benchmarks/olympiadbench/test.jsonl", "olympiadbench"),
  "gsm8k": ("benchmarks/gsm8k/test.jsonl", "gsm8k"),
  "math_level5_train": ("train/math_level5_train.jsonl", "math_train"),
}
EVAL_BENCHMARKS = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k")
TRAIN_SET = "math_level5_train"


def _check_name(name: str) -> None:
  if name not in BENCHMARK_FILES:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {tuple(BENCHMARK_FILES)}")


def benchmark_path(name: str, data_root: str | pathlib.Path = DEFAULT_DATA_ROOT) -> pathlib.Path:
  """Path of a named benchmark (or the training file) under `data_root`."""
  _check_name(name)
  path = pathlib.Path(data_root) / BENCHMARK_FILES[name][0]
  if not path.is_file():
    raise FileNotFoundError(
      f"benchmark {name!r} not found at {path}; set data_root to the folder that holds "
      "benchmarks/ and train/ (see ../shared/data/README.md)"
    )
  return path


def gold_rule(name: str) -> str:
  """The `gold_answer` rule of a named benchmark ("math_level5_train" -> "math_train")."""
  _check_name(name)
  return BENCHMARK_FILES[name][1]


def load_benchmark(
  name: str, data_root: str | pathlib.Path = DEFAULT_DATA_ROOT, on_bad_row: str = "skip"
) -> Examples:
  """All examples {id, problem, gold, benchmark} of a named benchmark."""
  return read_examples(benchmark_path(name, data_root), gold_rule(name), on_bad_row=on_bad_row)
