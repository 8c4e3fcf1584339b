"""Building a run's parts from its config and plan: mesh, tokenizer, policy, data, grader,
and the `Run` that holds them (what every function of the loop reads).

`prepare(config, workdir)` loads and checks everything before it writes anything: a refused
run (a wrong path, a checkpoint of another shape) leaves the workdir as it was, or absent.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax import hf
from egrc_jax.data import chat
from egrc_jax.data.pipeline import DataConfig, PromptPipeline, load_examples
from egrc_jax.grading import GraderPool, extract_answer
from egrc_jax.model import ModelConfig, get_preset
from egrc_jax.sampler import decode_texts
from egrc_jax.sharding import gather_rows, init_model, make_mesh, process_rows
from egrc_jax.trainer import diagnostics
from egrc_jax.trainer.checkpoint import (
  Checkpointer,
  CheckpointError,
  check_model_shape,
  check_writable,
  latest_complete_step,
  read_meta,
)
from egrc_jax.trainer.metrics import MetricsWriter
from egrc_jax.trainer.plan import EvalPlan, RunPlan, StagePlan, bind_tokens, build_plan
from egrc_jax.trainer.step import Programs

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


def _model_settings(c) -> dict:
  return {
    "dtype": c.model.dtype,
    "param_dtype": c.model.param_dtype,
    "attention_impl": c.model.attention,
  }


def preset_model_config(c) -> ModelConfig:
  """The ModelConfig of model.preset with the run's dtypes and attention (model.hidden_size /
  model.num_layers, when set, reshape the preset)."""
  shape = {k: v for k in ("hidden_size", "num_layers") if (v := c.model[k])}
  return get_preset(c.model.preset, **_model_settings(c), **shape)


def load_policy(c, mesh):
  """(ModelConfig, sharded Transformer) from model.hf_path, or a random-init preset."""
  if c.model.hf_path:
    return hf.load_model(c.model.hf_path, mesh=mesh, **_model_settings(c))
  cfg = preset_model_config(c)
  return cfg, init_model(cfg, mesh, seed=c.seed)


def check_tokenizer(tokenizer, model_cfg) -> None:
  """A tokenizer whose ids do not fit the model's embedding table is refused."""
  if len(tokenizer) > model_cfg.vocab_size:
    raise ValueError(
      f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
      f"{model_cfg.vocab_size}: this tokenizer does not belong to this model; point "
      "model.tokenizer_path at the model's own tokenizer"
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


def train_prompts(cfg: DataConfig, tokenizer) -> PromptStream:
  pipeline = PromptPipeline(cfg, tokenizer)
  log.info(
    "training prompts: %d (filtered %d long, %d bad rows)",
    pipeline.num_examples,
    pipeline.num_filtered,
    pipeline.num_bad_rows,
  )
  return PromptStream(pipeline)


def eval_prompts(cfg: DataConfig | None, tokenizer, num_prompts: int) -> PromptSet | None:
  """The first `num_prompts` evaluation problems that fit max_prompt_tokens, tokenized."""
  if cfg is None:
    return None
  examples = []
  for ex in load_examples(cfg).examples:
    ids = chat.encode_prompt(tokenizer, ex["problem"], cfg.instruction, cfg.system_prompt)
    if len(ids) <= cfg.max_prompt_tokens:
      examples.append({**ex, "prompt_ids": list(ids)})
    if len(examples) == num_prompts:
      break
  return PromptSet(examples)


class Grader:
  """Response texts -> correctness, by extracting the final answer and grading it.

  think_open: the prompts end inside a think block (`chat.opens_think`), so a response
  without `</think>` has no answer."""

  def __init__(self, c, tokenizer, think_open: bool = False):
    self.tokenizer, self.think_open = tokenizer, think_open
    self.pool = GraderPool(
      num_workers=c.grading.workers, timeout_s=c.grading.timeout_s, mode=c.grading.mode
    )

  def grade(self, texts: list[str], golds: list[str]) -> list[bool]:
    return self.pool.grade([extract_answer(t, self.think_open) for t in texts], golds)

  def grade_rollout(self, rollout, golds: list[str]) -> np.ndarray:
    """Correctness [B] of a (host) rollout's rows: each process decodes and grades its own
    rows, and every process gets all verdicts."""
    rows = process_rows(len(golds))
    texts = decode_texts(jax.tree.map(lambda x: x[rows], rollout), self.tokenizer)
    return gather_rows(np.asarray(self.grade(texts, golds[rows]), bool))

  def close(self):
    self.pool.close()


def make_grader(c, tokenizer) -> Grader:
  return Grader(c, tokenizer, think_open=chat.opens_think(tokenizer))


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


# -- the run ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A run's parts, loaded and checked (`prepare`); the loop's functions read them."""

  config: object  # the finalized ConfigDict (written to <workdir>/config.json)
  plan: RunPlan
  workdir: str
  stages: tuple[StagePlan, ...]  # the plan's stages, bound to the tokenizer's stop tokens
  eval: EvalPlan  # likewise
  mesh: jax.sharding.Mesh | None
  tokenizer: object
  model_cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: nnx.State  # the starting policy params
  ref_params: nnx.State | None  # the frozen reference (a copy), when some stage has KL
  train_data: PromptStream
  eval_data: PromptSet | None
  connector_ids: np.ndarray
  programs: Programs
  grader: Grader | None = None  # opened by `open`
  ckpt: Checkpointer | None = None
  writer: MetricsWriter | None = None

  def open(self) -> None:
    """Create the workdir and open what writes into it (after every check passed)."""
    c = self.config
    check_writable(self.workdir)
    self.ckpt = Checkpointer(self.workdir, c.checkpoint.keep)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        f.write(c.to_json(indent=1))
    self.writer = MetricsWriter(self.workdir, self.plan.total_steps, c.log.tensorboard)
    self.grader = make_grader(c, self.tokenizer)

  def close(self) -> None:
    for part in (self.grader, self.ckpt, self.writer):
      if part is not None:
        part.close()

  @property
  def model(self):
    """The starting policy as a module (what a finished re-run replaces by its final one)."""
    return nnx.merge(self.graphdef, self.params)


def check_existing_run(workdir: str, plan: RunPlan, model_cfg: ModelConfig) -> None:
  """A workdir that holds checkpoints resumes only the same stage layout and model shape."""
  latest = latest_complete_step(workdir)
  if latest is None:
    return
  ckpts = os.path.join(workdir, "checkpoints")
  meta = read_meta(os.path.join(ckpts, str(latest)))
  if meta.get("stage_names") != plan.stage_names:
    raise CheckpointError(
      f"the checkpoint in {workdir} belongs to a run with stages {meta.get('stage_names')}, "
      f"not {plan.stage_names}; use a fresh --workdir"
    )
  check_model_shape(meta.get("model_config", {}), model_cfg, f"checkpoint step {latest} in {ckpts}")


def prepare(config, workdir: str) -> Run:
  """Everything a run needs, loaded and checked; nothing written yet (`Run.open` does)."""
  check_writable(workdir, create=False)
  c, plan = config, build_plan(config)
  mesh = mesh_from_config(c)
  tokenizer = load_tokenizer(c)
  model_cfg, model = load_policy(c, mesh)
  check_tokenizer(tokenizer, model_cfg)
  stop, pad = chat.stop_ids(tokenizer, model_cfg), chat.pad_id(tokenizer)
  stages = tuple(
    dataclasses.replace(s, sampling=bind_tokens(s.sampling, stop, pad)) for s in plan.stages
  )
  ev = dataclasses.replace(plan.eval, sampling=bind_tokens(plan.eval.sampling, stop, pad))
  graphdef, params = nnx.split(model, nnx.Param)
  use_ref = any(s.loss.kl_kind is not None for s in stages)
  # The frozen reference: the run's starting params (a copy: the policy's are donated).
  ref_params = jax.tree.map(jnp.copy, params) if use_ref else None
  run = Run(
    config=c,
    plan=plan,
    workdir=workdir,
    stages=stages,
    eval=ev,
    mesh=mesh,
    tokenizer=tokenizer,
    model_cfg=model_cfg,
    graphdef=graphdef,
    params=params,
    ref_params=ref_params,
    train_data=train_prompts(plan.data.train, tokenizer),
    eval_data=eval_prompts(plan.data.eval, tokenizer, plan.eval.num_prompts),
    connector_ids=diagnostics.connector_token_ids(tokenizer, c.log.connectors),
    programs=Programs(graphdef, params, plan.optim, c.loss.vocab_chunk, mesh),
  )
  check_existing_run(workdir, plan, model_cfg)
  return run
