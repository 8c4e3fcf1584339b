"""Benchmark evaluation: pass@1 with standard errors, lengths, truncation, length ratios.

  python -m egrc_jax.evaluate --model=DIR --workdir=OUT [--limit=K] ...   (docs/evaluate.md)

`evaluate(EvalConfig(...))` runs or resumes an evaluation; `scoring` holds the estimators,
`samples_io` the samples.jsonl format, `model_io` the `--model` path resolution.
"""

from egrc_jax.evaluate.model_io import ModelSource, load, load_tokenizer, resolve, restore_params
from egrc_jax.evaluate.runner import EvalConfig, evaluate, prompt_seed_id
from egrc_jax.evaluate.samples_io import append_samples, done_problems, read_samples, repair
from egrc_jax.evaluate.scoring import average, benchmark_summary, markdown_table, pass_at_1

__all__ = [
  "EvalConfig",
  "ModelSource",
  "append_samples",
  "average",
  "benchmark_summary",
  "done_problems",
  "evaluate",
  "load",
  "load_tokenizer",
  "markdown_table",
  "pass_at_1",
  "prompt_seed_id",
  "read_samples",
  "repair",
  "resolve",
  "restore_params",
]
