"""Building a run's parts from its config: mesh, tokenizer, policy, data, grader, loss.

Each function reads only the config keys it names; `Trainer` wires them together.
"""

from __future__ import annotations

import logging

import numpy as np

from egrc_jax import hf, losses
from egrc_jax.data import chat
from egrc_jax.data.pipeline import DataConfig, PromptPipeline, load_examples
from egrc_jax.grading import GraderPool, extract_answer
from egrc_jax.model import get_preset
from egrc_jax.sharding import init_model, make_mesh

log = logging.getLogger(__name__)


def mesh_from_config(c):
  return make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)


def load_tokenizer(c):
  path = c.model.tokenizer_path or c.model.hf_path
  if path == BYTE_TOKENIZER:
    return byte_tokenizer()
  if not path:
    raise ValueError("set model.tokenizer_path (or model.hf_path): the run needs a tokenizer")
  return chat.load_tokenizer(path)


def load_policy(c, mesh):
  """(ModelConfig, sharded Transformer) from model.hf_path, or a random-init preset."""
  overrides = {
    k: v for k, v in (("dtype", c.model.dtype), ("param_dtype", c.model.param_dtype)) if v
  }
  if c.model.hf_path:
    cfg, model = hf.load_model(c.model.hf_path, mesh=mesh, **overrides)
  else:
    shape = {k: v for k in ("hidden_size", "num_layers") if (v := c.model[k])}
    cfg = get_preset(c.model.preset, **overrides, **shape)
    model = init_model(cfg, mesh, seed=c.seed)
  return cfg, model


def check_tokenizer(tokenizer, model_cfg) -> None:
  """A tokenizer whose ids do not fit the model's embedding table is refused."""
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(
      f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
      f"{model_cfg.vocab_size}: this tokenizer does not belong to this model; point "
      "model.tokenizer_path at the model's own tokenizer"
    )


def loss_config(c) -> losses.LossConfig:
  l = c.loss
  return losses.LossConfig(
    eps_low=l.eps_low,
    eps_high=l.eps_high,
    dual_clip_c=l.dual_clip_c or None,
    kl_kind=None if l.kl_kind == "none" else l.kl_kind,
    kl_coef=l.kl_coef,
    entropy_coef=l.entropy_coef,
    agg_mode=l.agg_mode,
    max_len_norm=c.rollout.max_new_tokens,
    entropy_select=l.entropy_select,
    rho=l.rho,
    high_entropy_weight=l.high_entropy_weight,
    vocab_chunk=l.vocab_chunk,
  )


def _data_config(c, benchmark, source, gold_rule, shuffle) -> DataConfig:
  d = c.data
  return DataConfig(
    benchmark=benchmark,
    source=source,
    gold_rule=gold_rule,
    data_root=d.data_root,
    batch_size=d.prompts_per_step,
    max_prompt_tokens=d.max_prompt_tokens,
    seed=c.seed,
    shuffle=shuffle,
    on_bad_row=d.on_bad_row,
    instruction=d.instruction,
    system_prompt=d.system_prompt,
    # Every process iterates the same global batches (prompts are small): the run is then
    # the same for any process count, and each process grades only its own rows.
    shard_index=0,
    shard_count=1,
  )


class PromptStream:
  """The training prompts as an endless, resumable stream of lists of examples."""

  def __init__(self, pipeline: PromptPipeline):
    self.pipeline = pipeline
    self._it = iter(pipeline)

  def next_batch(self) -> list[dict]:
    b = next(self._it)
    mask = np.asarray(b["mask_BT"])
    tokens = np.asarray(b["tokens_BT"])
    return [
      {"prompt_ids": tokens[i][mask[i]].tolist(), "gold": b["gold"][i], "id": b["id"][i]}
      for i in range(tokens.shape[0])
    ]

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)


class PromptSet:
  """A fixed, ordered list of tokenized evaluation prompts."""

  def __init__(self, examples: list[dict]):
    self._examples = examples

  def all(self) -> list[dict]:
    return self._examples


def train_prompts(c, tokenizer) -> PromptStream:
  d = c.data
  cfg = _data_config(c, d.train_benchmark, d.train_source, d.train_gold_rule, d.shuffle)
  pipeline = PromptPipeline(cfg, tokenizer)
  log.info(
    "training prompts: %d (filtered %d long, %d bad rows)",
    pipeline.num_examples,
    pipeline.num_filtered,
    pipeline.num_bad_rows,
  )
  return PromptStream(pipeline)


def eval_prompts(c, tokenizer) -> PromptSet | None:
  d = c.data
  if c.eval.num_prompts <= 0 or not (d.eval_benchmark or d.eval_source):
    return None
  cfg = _data_config(c, d.eval_benchmark, d.eval_source, d.eval_gold_rule, False)
  examples = []
  for ex in load_examples(cfg).examples:
    ids = chat.encode_prompt(tokenizer, ex["problem"], d.instruction, d.system_prompt)
    if len(ids) <= d.max_prompt_tokens:
      examples.append({**ex, "prompt_ids": list(ids)})
    if len(examples) == c.eval.num_prompts:
      break
  return PromptSet(examples)


class Grader:
  """Response texts -> correctness, by extracting the final answer and grading it.

  think_open: the prompts end inside a think block (`chat.opens_think`), so a response
  without `</think>` has no answer."""

  def __init__(self, c, think_open: bool = False):
    self.think_open = think_open
    self.pool = GraderPool(
      num_workers=c.grading.workers, timeout_s=c.grading.timeout_s, mode=c.grading.mode
    )

  def grade(self, texts: list[str], golds: list[str]) -> list[bool]:
    return self.pool.grade([extract_answer(t, self.think_open) for t in texts], golds)

  def close(self):
    self.pool.close()


def make_grader(c, tokenizer) -> Grader:
  return Grader(c, think_open=chat.opens_think(tokenizer))


BYTE_TOKENIZER = "bytes"  # model.tokenizer_path value for the built-in byte-level tokenizer


def byte_tokenizer():
  """A 260-token byte-level tokenizer with a chat template, for random-init CPU runs (the
  `tiny` config), where no real tokenizer directory exists. Any text round-trips."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"]
  tok.add_special_tokens(specials)
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token="<|pad|>",
    eos_token="<|eos|>",
    chat_template=(
      "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
      "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
  )
