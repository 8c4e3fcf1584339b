"""Benchmark evaluation: batched, sharded sampling, pooled grading, resumable sample log.

Shape letters: P prompts per batch, N samples per prompt, B = P * N rows, C max_new_tokens.

Per benchmark: the first `limit` problems (file order) that are not yet complete in
<workdir>/samples.jsonl are sorted by prompt length (so a batch shares a prompt bucket), cut
into batches of `batch_prompts` prompts (the last one padded with copies of its final prompt,
so every batch has one shape and the sampler compiles once per prompt bucket), sampled N
times each, graded, and appended to samples.jsonl with a flush per batch. Scores are then
computed from samples.jsonl over the selected problems (docs/evaluate.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
import zlib

import jax
import numpy as np

from egrc_jax.data import benchmarks as bench_data
from egrc_jax.data import chat
from egrc_jax.evaluate import model_io, samples_io, scoring
from egrc_jax.grading import GraderPool, extract_answer
from egrc_jax.sampler import SamplingConfig, generate
from egrc_jax.sampler.config import DEFAULT_BUCKETS
from egrc_jax.sharding import make_mesh, to_host

log = logging.getLogger(__name__)

CONFIG_FILE = "eval_config.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Settings that change what a sample is: a resumed run must use the same ones.
RESUME_KEYS = (
  "model", "n", "temperature", "top_p", "top_k", "greedy", "max_new_tokens", "seed",
  "instruction", "system_prompt",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """One evaluation run; every field is a CLI flag of the same name (docs/evaluate.md)."""

  model: str  # HF directory, trainer workdir, or checkpoint step directory
  workdir: str  # where samples.jsonl, results.json/.md and eval_config.json go
  benchmarks: tuple[str, ...] = bench_data.EVAL_BENCHMARKS
  n: int = 16  # samples per problem
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  greedy: bool = False
  max_new_tokens: int = 32768
  limit: int = 0  # first K problems of each benchmark (0: all)
  batch_prompts: int = 8  # prompts per sampler call (B = batch_prompts * n rows)
  baseline: str = ""  # results.json of the starting model (length ratio, accuracy delta)
  data_root: str = bench_data.DEFAULT_DATA_ROOT
  mesh: tuple[int, int, int] | None = None  # (data, fsdp, tensor); None: one device
  grader_workers: int = 2
  grader_timeout_s: float = 5.0
  seed: int = 0
  instruction: str = chat.INSTRUCTION
  system_prompt: str = ""
  tokenizer: str = ""  # tokenizer directory (default: the model's)
  save_token_entropy: bool = False  # store token ids and per-token entropies per sample
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  loop: str = "continuous"  # the decode loop: continuous (slots refilled on device) | lockstep
  num_slots: int = 64  # continuous: rows decoded at once
  param_dtype: str = ""  # override the checkpoint's weight dtype (float32 | bfloat16)
  dtype: str = ""  # override the compute dtype

  def __post_init__(self):
    unknown = [b for b in self.benchmarks if b not in bench_data.BENCHMARK_FILES]
    if not self.benchmarks or unknown:
      raise ValueError(
        f"benchmarks={self.benchmarks}: unknown {unknown}; choose from "
        f"{tuple(bench_data.BENCHMARK_FILES)}"
      )
    for name in ("n", "batch_prompts", "max_new_tokens", "grader_workers"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.limit < 0:
      raise ValueError(f"limit={self.limit} must be >= 0 (0 evaluates every problem)")
    if self.greedy and self.n > 1:
      raise ValueError(f"greedy decoding gives identical samples; use n=1, not n={self.n}")

  def sampling(self, stop_ids: tuple[int, ...], pad_id: int) -> SamplingConfig:
    return SamplingConfig(
      temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, greedy=self.greedy,
      max_new_tokens=self.max_new_tokens, stop_token_ids=stop_ids, pad_id=pad_id,
      prompt_buckets=self.prompt_buckets, loop=self.loop, num_slots=self.num_slots,
    )  # fmt: skip

  def resume_settings(self) -> dict:
    d = dataclasses.asdict(self)
    d["model"] = str(pathlib.Path(self.model).absolute())
    return {k: d[k] for k in RESUME_KEYS}


def prompt_seed_id(benchmark: str, index: int) -> int:
  """A stable int32 id per (benchmark, problem index) for the sampler's PRNG keys: a
  problem's samples do not depend on the batch it lands in or on `limit`."""
  return (zlib.crc32(benchmark.encode()) % 1000) * 100_000 + index


def check_resume(workdir: pathlib.Path, cfg: EvalConfig) -> None:
  """Refuse to mix samples drawn under different settings in one samples.jsonl."""
  path = workdir / CONFIG_FILE
  mine = cfg.resume_settings()
  if path.is_file():
    saved = json.loads(path.read_text()).get("resume_settings", {})
    diff = {k: (saved.get(k), mine[k]) for k in RESUME_KEYS if saved.get(k) != mine[k]}
    if diff:
      detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
      raise ValueError(
        f"{workdir} holds samples drawn with other settings ({detail}); use a fresh --workdir "
        "or the same settings"
      )
  record = {"resume_settings": mine, "config": dataclasses.asdict(cfg)}
  if _is_writer():
    path.write_text(json.dumps(record, indent=1) + "\n")


def row_records(
  rollout, tokenizer, batch: list[dict], n: int, grades, save_token_entropy: bool
) -> list[dict]:
  """One samples.jsonl record per row of the real (unpadded) prompts of a batch."""
  tokens_BC = np.asarray(rollout.completion_tokens_BC)
  lengths_B = np.asarray(rollout.lengths_B)
  trunc_B = np.asarray(rollout.truncated_B)
  ent_BC = np.asarray(rollout.entropy_BC)
  out = []
  for b in range(len(batch) * n):
    ex, length = batch[b // n], int(lengths_B[b])
    ent = ent_BC[b, :length]
    g = grades[b]
    rec = {
      "benchmark": ex["benchmark_name"],
      "id": ex["id"],
      "problem_index": ex["index"],
      "sample": b % n,
      "text": ex["texts"][b % n],
      "num_tokens": length,
      "answer": g.answer,
      "gold": ex["gold"],
      "correct": bool(g.correct),
      "grade_status": g.status,
      "truncated": bool(trunc_B[b]),
      "entropy_mean": float(ent.mean()) if length else 0.0,
      "entropy_max": float(ent.max()) if length else 0.0,
    }
    if save_token_entropy:
      rec["token_ids"] = tokens_BC[b, :length].tolist()
      rec["token_entropy"] = [round(float(x), 4) for x in ent]
    out.append(rec)
  return out


class _Progress:
  def __init__(self, total: int):
    self.total, self.done, self.samples, self.tokens = total, 0, 0, 0
    self.t0 = time.time()

  def update(self, bench: str, problems: int, samples: int, tokens: int) -> None:
    self.done, self.samples, self.tokens = (
      self.done + problems,
      self.samples + samples,
      (self.tokens + tokens),
    )
    dt = max(time.time() - self.t0, 1e-9)
    print(
      f"[{bench}] problems {self.done}/{self.total} | {self.samples / dt:.2f} samples/s | "
      f"{self.tokens / dt:.1f} tokens/s | {dt:.0f}s",
      flush=True,
    )

  def summary(self) -> dict:
    dt = max(time.time() - self.t0, 1e-9)
    return {
      "samples": self.samples, "tokens": self.tokens, "seconds": dt,
      "samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt,
    }  # fmt: skip


def _select(cfg: EvalConfig) -> dict[str, list[dict]]:
  out = {}
  for name in cfg.benchmarks:
    examples = bench_data.load_benchmark(name, cfg.data_root).examples
    if cfg.limit:
      examples = examples[: cfg.limit]
    out[name] = [{**ex, "benchmark_name": name, "index": i} for i, ex in enumerate(examples)]
  return out


def _generate_all(cfg, todo: dict[str, list[dict]], samples_path, total: int) -> dict:
  """Sample, grade and log every problem of `todo`; returns the throughput summary."""
  mesh = make_mesh(*cfg.mesh) if cfg.mesh else None
  src, model_cfg, model = model_io.load(
    cfg.model, mesh, param_dtype=cfg.param_dtype or None, dtype=cfg.dtype or None
  )
  tokenizer = model_io.load_tokenizer(src, cfg.tokenizer or None)
  scfg = cfg.sampling(chat.stop_ids(tokenizer, model_cfg), chat.pad_id(tokenizer))
  think_open = chat.opens_think(tokenizer)  # R1-Distill: no </think> means no answer
  progress = _Progress(total)
  with GraderPool(cfg.grader_workers, cfg.grader_timeout_s, mode="math") as pool:
    for name, examples in todo.items():
      for ex in examples:
        ex["prompt"] = chat.encode_prompt(
          tokenizer, ex["problem"], cfg.instruction, cfg.system_prompt
        )
      examples.sort(key=lambda ex: len(ex["prompt"]))
      for s in range(0, len(examples), cfg.batch_prompts):
        batch = examples[s : s + cfg.batch_prompts]
        padded = batch + [batch[-1]] * (cfg.batch_prompts - len(batch))
        rollout = to_host(generate(
          model, [ex["prompt"] for ex in padded], scfg, num_samples=cfg.n, seed=cfg.seed,
          mesh=mesh, prompt_ids=[prompt_seed_id(name, ex["index"]) for ex in padded],
        ))  # fmt: skip
        rows = len(batch) * cfg.n
        lengths = np.asarray(rollout.lengths_B)[:rows]
        tokens = np.asarray(rollout.completion_tokens_BC)[:rows]
        texts = [tokenizer.decode(tokens[b, : lengths[b]], skip_special_tokens=True)
                 for b in range(rows)]  # fmt: skip
        for p, ex in enumerate(batch):
          ex["texts"] = texts[p * cfg.n : (p + 1) * cfg.n]
        golds = [ex["gold"] for ex in batch for _ in range(cfg.n)]
        grades = pool.grade_details([extract_answer(t, think_open) for t in texts], golds)
        records = row_records(rollout, tokenizer, batch, cfg.n, grades, cfg.save_token_entropy)
        if _is_writer():
          samples_io.append_samples(samples_path, records)
        progress.update(name, len(batch), rows, int(lengths.sum()))
  return progress.summary()


def _is_writer() -> bool:
  """Multi-host: every process samples and grades; process 0 alone writes files."""
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def evaluate(cfg: EvalConfig) -> dict:
  """Run (or resume) the evaluation; writes and returns results.json's content.

  Every input (the model, its tokenizer, the benchmarks, the baseline) is checked before
  the workdir is created or its eval_config.json written, so a typo leaves nothing behind.
  """
  src = model_io.resolve(cfg.model)
  if not cfg.tokenizer and src.tokenizer_dir is None:
    model_io.load_tokenizer(src)  # raises: no tokenizer found, pass --tokenizer
  if cfg.tokenizer and not pathlib.Path(cfg.tokenizer).is_dir():
    raise FileNotFoundError(f"--tokenizer={cfg.tokenizer!r} is not a directory")
  if cfg.baseline and not pathlib.Path(cfg.baseline).is_file():
    raise FileNotFoundError(
      f"--baseline={cfg.baseline!r} not found: pass the results.json of an evaluation"
    )
  selected = _select(cfg)
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_resume(workdir, cfg)
  samples_path = workdir / samples_io.SAMPLES_FILE
  if _is_writer():
    samples_io.repair(samples_path)
  _sync("samples repaired")  # every process then reads the same finished problems
  done = samples_io.done_problems(samples_io.read_samples(samples_path), cfg.n)
  todo = {
    name: [ex for ex in exs if (name, ex["id"]) not in done] for name, exs in selected.items()
  }
  todo = {k: v for k, v in todo.items() if v}
  total = sum(len(v) for v in todo.values())
  skipped = sum(len(v) for v in selected.values()) - total
  print(f"evaluating {total} problems x {cfg.n} samples ({skipped} already done)", flush=True)
  throughput = _generate_all(cfg, todo, samples_path, total) if total else None

  baseline = {}
  if cfg.baseline:
    baseline = json.loads(pathlib.Path(cfg.baseline).read_text()).get("benchmarks", {})
  records = samples_io.read_samples(samples_path)
  summaries = {}
  for name, exs in selected.items():
    ids = {ex["id"] for ex in exs}
    mine = [r for r in records if r["benchmark"] == name and r["id"] in ids and r["sample"] < cfg.n]
    summaries[name] = scoring.benchmark_summary(mine, baseline.get(name))
  avg = scoring.average(summaries)
  results = {
    "model": str(pathlib.Path(cfg.model).absolute()),
    "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workdir"},
    "benchmarks": summaries,
    "average": avg,
    "throughput": throughput,
    "estimators": scoring.__doc__,
  }
  if not _is_writer():
    return results
  (workdir / RESULTS_JSON).write_text(json.dumps(results, indent=1) + "\n")
  table = scoring.markdown_table(summaries, avg)
  title = f"# Evaluation of `{cfg.model}`\n\n"
  settings = (
    f"n={cfg.n}, temperature={cfg.temperature}, top_p={cfg.top_p}, "
    f"max_new_tokens={cfg.max_new_tokens}, limit={cfg.limit or 'all'}; pass@1 = mean accuracy "
    "over the n samples, averaged over problems; SE = std of per-problem accuracies / "
    "sqrt(problems).\n\n"
  )
  (workdir / RESULTS_MD).write_text(title + settings + table)
  print(table, flush=True)
  return results
