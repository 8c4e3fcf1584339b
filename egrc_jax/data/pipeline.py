"""The grain prompt pipeline: tokenized, length-filtered, sharded, shuffled, repeated, batched.

  examples --tokenize (chat template)--> drop prompts longer than max_prompt_tokens (counted)
  --> grain.MapDataset.source --> [shard_index::shard_count] --> shuffle(seed), reshuffled
  every epoch --> repeat(num_epochs) --> batch(per-process batch) --> PromptIterator

Examples are tokenized once up front (cheap next to RL steps, and it makes the filtered count
exact and the index space fixed). The iterator's state is a small JSON dict; a run restored
from it continues with exactly the batch that would have come next.

Shape letters:
  B  prompts in this process's batch (batch_size // shard_count)
  T  prompt token slots (max_prompt_tokens; static, so the sampler compiles once)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import jax
import numpy as np

from egrc_jax.data import benchmarks, chat, sources
from egrc_jax.data.gold import BENCHMARKS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Prompt pipeline settings (docs/data.md documents each field)."""

  benchmark: str = "math_level5_train"  # named file under data_root (benchmarks.BENCHMARK_FILES)
  source: str = ""  # if set, read this source instead (JSONL/Parquet/TFDS/array_record/"hf:")
  gold_rule: str = "math_train"  # gold_answer rule for `source` (ignored for named benchmarks)
  kind: str = "auto"  # source format: auto | jsonl | parquet | tfds | array_record | hf
  split: str = ""  # tfds/array_record/hf split ("" = tfds "train" / all array_record / hf "train")
  data_root: str = benchmarks.DEFAULT_DATA_ROOT  # folder holding benchmarks/ and train/
  batch_size: int = 8  # prompts per step over all processes
  max_prompt_tokens: int = 1024  # [T] longer prompts are dropped (and counted)
  seed: int = 0  # shuffle seed (epoch e uses seed + e)
  shuffle: bool = True
  num_epochs: int = 0  # passes over the data; 0 = repeat forever (the trainer counts steps)
  drop_remainder: bool = True  # drop an epoch-final partial batch (only with num_epochs > 0)
  on_bad_row: str = "skip"  # malformed rows: "skip" (counted, logged) | "error"
  instruction: str = chat.INSTRUCTION  # appended to the problem on its own line; "" = none
  system_prompt: str = ""  # optional system message
  padding_side: str = "left"  # "left": prompts end at slot T-1 (decode starts together)
  pad_id: int = -1  # pad token; -1 = tokenizer's pad_token_id, else eos_token_id
  shard_index: int = -1  # this process's shard; -1 = jax.process_index()
  shard_count: int = -1  # number of shards; -1 = jax.process_count()
  read_threads: int = 0  # grain ReadOptions.num_threads (0: data is in memory)

  def __post_init__(self):
    if not self.source and self.benchmark not in benchmarks.BENCHMARK_FILES:
      raise ValueError(
        f"unknown benchmark {self.benchmark!r}; expected one of "
        f"{tuple(benchmarks.BENCHMARK_FILES)}, or set source=<path or hf:name>"
      )
    if self.source and self.gold_rule not in BENCHMARKS:
      raise ValueError(f"gold_rule must be one of {BENCHMARKS}, got {self.gold_rule!r}")
    if self.kind not in sources.SOURCE_KINDS:
      raise ValueError(f"kind must be one of {sources.SOURCE_KINDS}, got {self.kind!r}")
    if self.on_bad_row not in sources.ON_BAD_ROW:
      raise ValueError(f"on_bad_row must be one of {sources.ON_BAD_ROW}, got {self.on_bad_row!r}")
    if self.padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
    for field in ("batch_size", "max_prompt_tokens"):
      if getattr(self, field) <= 0:
        raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")
    if self.num_epochs < 0:
      raise ValueError(f"num_epochs must be >= 0 (0 = forever), got {self.num_epochs}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
    if (self.shard_index < 0) != (self.shard_count < 0):
      raise ValueError(
        f"set both shard_index and shard_count or neither (got {self.shard_index}, "
        f"{self.shard_count}); -1 means the JAX process index/count"
      )
    if self.shard_count > 0 and not 0 <= self.shard_index < self.shard_count:
      raise ValueError(
        f"need 0 <= shard_index < shard_count, got {self.shard_index}, {self.shard_count}"
      )

  def shard(self) -> tuple[int, int]:
    """(shard_index, shard_count), defaulting to this JAX process."""
    if self.shard_count > 0:
      return self.shard_index, self.shard_count
    return jax.process_index(), jax.process_count()


def load_examples(cfg: DataConfig) -> sources.Examples:
  """The configured source's examples (named benchmark, or `source` with `gold_rule`)."""
  if cfg.source:
    return sources.read_examples(
      cfg.source, cfg.gold_rule, kind=cfg.kind, split=cfg.split or None, on_bad_row=cfg.on_bad_row
    )
  return benchmarks.load_benchmark(cfg.benchmark, cfg.data_root, on_bad_row=cfg.on_bad_row)


def resolve_pad_id(cfg: DataConfig, tokenizer) -> int:
  if cfg.pad_id >= 0:
    return cfg.pad_id
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  raise ValueError("tokenizer has no pad or eos token; set DataConfig.pad_id")


def collate(elements: Sequence[dict], max_len: int, pad_id: int, left: bool) -> dict:
  """List of tokenized examples -> batch dict.

  tokens_BT int32 (pad_id outside the prompt), mask_BT bool, lengths_B int32, plus the
  string lists id, problem, gold, benchmark (length B).
  """
  b = len(elements)
  tokens_BT = np.full((b, max_len), pad_id, dtype=np.int32)
  mask_BT = np.zeros((b, max_len), dtype=bool)
  lengths_B = np.array([len(e["prompt_ids"]) for e in elements], dtype=np.int32)
  for i, e in enumerate(elements):
    n = lengths_B[i]
    sl = slice(max_len - n, max_len) if left else slice(0, n)
    tokens_BT[i, sl] = e["prompt_ids"]
    mask_BT[i, sl] = True
  batch = {"tokens_BT": tokens_BT, "mask_BT": mask_BT, "lengths_B": lengths_B}
  for key in ("id", "problem", "gold", "benchmark"):
    batch[key] = [e[key] for e in elements]
  return batch


class PromptIterator:
  """Batches of prompts; `get_state()` / `set_state()` round-trip through JSON."""

  def __init__(self, grain_iter, fingerprint: dict):
    self._it = grain_iter
    self._fingerprint = fingerprint

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "pipeline": dict(self._fingerprint)}

  def set_state(self, state: dict) -> None:
    if state.get("pipeline") != self._fingerprint:
      raise ValueError(
        f"iterator state was saved by a different pipeline {state.get('pipeline')}, this one "
        f"is {self._fingerprint}; resume with the same data, seed, batch size and shards"
      )
    self._it.set_state(state["grain"])


class PromptPipeline:
  """Tokenized prompt batches for one process. `iter(pipeline)` gives a `PromptIterator`.

  Attributes: num_examples (after filtering, all shards), num_filtered (prompts longer than
  max_prompt_tokens), num_bad_rows (malformed rows skipped), shard_size, batch_size (per
  process), steps_per_epoch, dataset (the grain MapDataset of batches).
  """

  def __init__(self, cfg: DataConfig, tokenizer, examples: Sequence[dict] | None = None):
    self.cfg = cfg
    if examples is None:
      loaded = load_examples(cfg)
      examples, self.num_bad_rows = loaded.examples, loaded.num_bad
    else:
      self.num_bad_rows = 0
    kept = []
    for ex in examples:
      ids = chat.encode_prompt(tokenizer, ex["problem"], cfg.instruction, cfg.system_prompt)
      if len(ids) <= cfg.max_prompt_tokens:
        kept.append({**ex, "prompt_ids": np.asarray(ids, dtype=np.int32)})
    self.num_filtered = len(examples) - len(kept)
    self.num_examples = len(kept)
    if self.num_filtered:
      log.warning(
        "dropped %d of %d prompts longer than max_prompt_tokens=%d",
        self.num_filtered,
        len(examples),
        cfg.max_prompt_tokens,
      )
    shard_index, shard_count = cfg.shard()
    if cfg.batch_size % shard_count:
      raise ValueError(
        f"batch_size={cfg.batch_size} must be divisible by the "
        f"{shard_count} data shards (processes)"
      )
    self.batch_size = cfg.batch_size // shard_count
    ds = grain.MapDataset.source(kept)[shard_index::shard_count]
    self.shard_size = len(ds)
    if self.shard_size < self.batch_size:
      raise ValueError(
        f"shard {shard_index}/{shard_count} holds {self.shard_size} prompts, fewer than one "
        f"batch of {self.batch_size}; lower batch_size or max_prompt_tokens filtering"
      )
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed)  # index e*n + i reads epoch e's permutation (seed + e)
    ds = ds.repeat(cfg.num_epochs or None)
    pad_id, left = resolve_pad_id(cfg, tokenizer), cfg.padding_side == "left"
    drop = cfg.drop_remainder or not cfg.num_epochs  # an endless stream has no remainder
    self.dataset = ds.batch(
      self.batch_size,
      drop_remainder=drop,
      batch_fn=lambda els: collate(els, cfg.max_prompt_tokens, pad_id, left),
    )
    self.steps_per_epoch = self.shard_size // self.batch_size
    self._fingerprint = {
      "num_examples": self.num_examples,
      "shard_index": shard_index,
      "shard_count": shard_count,
      "batch_size": self.batch_size,
      "seed": cfg.seed,
      "shuffle": cfg.shuffle,
      "num_epochs": cfg.num_epochs,
    }

  def __iter__(self) -> PromptIterator:
    options = grain.ReadOptions(num_threads=self.cfg.read_threads, prefetch_buffer_size=0)
    return PromptIterator(iter(self.dataset.to_iter_dataset(options)), self._fingerprint)
