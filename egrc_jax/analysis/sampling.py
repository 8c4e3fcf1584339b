"""Fresh rollouts for the analyses that need a model: prompts, sampling, grading, and the
learner's per-token statistics recomputed by teacher forcing.

Shape letters: B rows (P prompts x G samples), Tp prompt bucket, C completion budget,
S = Tp + C, D hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx

from egrc_jax import losses
from egrc_jax.data import benchmarks, chat
from egrc_jax.data.sources import read_examples
from egrc_jax.evaluate import model_io
from egrc_jax.evaluate.runner import prompt_seed_id
from egrc_jax.grading import GraderPool, extract_answer
from egrc_jax.model import Transformer, positions_from_mask
from egrc_jax.sampler import Rollout, SamplingConfig, generate
from egrc_jax.sampler.config import DEFAULT_BUCKETS


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How `sample_and_grade` draws its groups (each a CLI flag of the analysis commands)."""

  n: int = 8  # G samples per prompt (a group)
  temperature: float = 0.6
  top_p: float = 1.0
  max_new_tokens: int = 1024
  limit: int = 8  # prompts
  seed: int = 0
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  grader_workers: int = 1
  # The instruction appended to each problem; None: the run's own (data.instruction of the
  # trainer run the model comes from) or, for a plain HF model, the standard math one.
  instruction: str | None = None

  def __post_init__(self):
    for name in ("n", "max_new_tokens", "limit", "grader_workers"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def load_prompts(spec: str, data_root: str, gold_rule: str = "math500") -> list[dict]:
  """Examples {id, problem, gold} of a benchmark name, or of a JSONL file (gold by `gold_rule`)."""
  if spec in benchmarks.BENCHMARK_FILES:
    return benchmarks.load_benchmark(spec, data_root).examples
  if not pathlib.Path(spec).is_file():
    raise FileNotFoundError(
      f"--prompts={spec!r} is neither a benchmark name {tuple(benchmarks.BENCHMARK_FILES)} nor a "
      "JSONL file"
    )
  return read_examples(spec, gold_rule).examples


@nnx.jit(static_argnames=("chunk",))
def teacher_forced_stats(model: Transformer, rollout: Rollout, temperature, chunk: int = 8192):
  """`losses.TokenStats` [B, C] of the completion tokens under softmax(logits / temperature),
  recomputed exactly as the learner does (vocab-chunked)."""
  tokens_BS, mask_BS = rollout.full_sequence()
  hidden_BSD = model(tokens_BS, positions_from_mask(mask_BS), mask_BS, return_hidden=True)
  Tp = rollout.prompt_tokens_BTp.shape[1]
  hidden_BCD = hidden_BSD[:, Tp - 1 : -1]  # position t predicts token t + 1
  return losses.token_stats(
    hidden_BCD, model.lm_head_weight(), rollout.completion_tokens_BC, temperature, chunk
  )


def sample_and_grade(
  model_path: str, prompts: str, settings: SampleSettings, data_root: str, tokenizer: str = ""
):
  """(model, tokenizer, examples, rollout, texts, correct_B) for the first `limit` prompts."""
  src, cfg, model = model_io.load(model_path)
  tok = model_io.load_tokenizer(src, tokenizer or None)
  examples = load_prompts(prompts, data_root)[: settings.limit]
  scfg = SamplingConfig(
    temperature=settings.temperature, top_p=settings.top_p,
    max_new_tokens=settings.max_new_tokens, stop_token_ids=chat.stop_ids(tok, cfg),
    pad_id=chat.pad_id(tok), prompt_buckets=settings.prompt_buckets,
  )  # fmt: skip
  instruction, system = prompt_format(src, settings.instruction)
  ids = [chat.encode_prompt(tok, ex["problem"], instruction, system) for ex in examples]
  seeds = [prompt_seed_id(prompts, i) for i in range(len(examples))]
  rollout = generate(model, ids, scfg, settings.n, settings.seed, prompt_ids=seeds)
  lengths = np.asarray(rollout.lengths_B)
  tokens = np.asarray(rollout.completion_tokens_BC)
  texts = [
    tok.decode(tokens[b, : lengths[b]], skip_special_tokens=True) for b in range(len(lengths))
  ]
  golds = [ex["gold"] for ex in examples for _ in range(settings.n)]
  with GraderPool(settings.grader_workers, mode="math") as pool:
    think_open = chat.opens_think(tok)  # R1-Distill: no </think> means no answer
    answers = [extract_answer(t, think_open) for t in texts]
    correct = np.asarray(pool.grade(answers, golds), bool)
  return model, tok, examples, rollout, texts, correct


def prompt_format(src: model_io.ModelSource, instruction: str | None) -> tuple[str, str]:
  """(instruction, system prompt) for prompting the model of `src` as it was trained: an
  explicit instruction wins; else the trainer run's data.instruction / data.system_prompt;
  else the standard math instruction and no system prompt."""
  data = (src.run_config or {}).get("data", {})
  if instruction is None:
    instruction = data.get("instruction", chat.INSTRUCTION)
  return instruction, data.get("system_prompt", "")


def host(x: jax.Array) -> np.ndarray:
  return np.asarray(jax.device_get(x))
