"""SFT warm start on the toy task: a small Qwen2-family model learns verbose reasoning.

    python -m egrc_jax.toy.sft --workdir=/tmp/toy_sft [--seed=S] \\
        [--config=configs/toy.py:sft.steps=N]

writes DIR/tokenizer/ (the toy tokenizer), DIR/data/ (train/test JSONL), DIR/sft/ (the model)
and DIR/sft_metrics.json, and prints the test accuracy and mean response length.

Loss: mean next-token cross entropy over response tokens only (the reasoning after "<think>",
the boxed answer and <eos>); the prompt is context, not a target:
    loss = sum_{b,t} m_bt * -log p(x_{b,t+1} | x_{b,<=t}) / sum_{b,t} m_bt
with m_bt = 1 where x_{b,t+1} is a response token.

Shape letters: B batch, T sequence length (prompt + response, right padded), V vocab.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from egrc_jax import cli
from egrc_jax.model import ModelConfig, Transformer, positions_from_mask
from egrc_jax.sharding import init_model
from egrc_jax.toy import task as task_lib
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.checkpoint import save_sft
from egrc_jax.toy.data import write_splits
from egrc_jax.toy.evaluate import evaluate


@dataclasses.dataclass(frozen=True)
class SftConfig:
  """The warm start (configs/toy.py's `sft` section; the data comes from `task` and `cot`,
  the evaluation settings from `eval`, the seed from the run)."""

  # model (Qwen2 family: q/k/v bias, untied head)
  hidden_size: int = 64  # D
  intermediate_size: int = 192  # F (SwiGLU width)
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  # data
  num_train: int = 10_000  # distinct training problems (one verbose solution each)
  # optimisation (AdamW, linear warmup then cosine decay to 10%)
  steps: int = 1000
  batch_size: int = 32
  pad_multiple: int = 32  # batches are padded to a multiple of this: few shapes to compile
  learning_rate: float = 3e-3
  warmup_fraction: float = 0.1  # share of the steps spent warming the learning rate up
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  log_every: int = 50  # steps between progress lines

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")
    if self.num_train < self.batch_size:
      raise ValueError(f"num_train={self.num_train} must be >= batch_size={self.batch_size}")
    if self.learning_rate <= 0 or not 0 <= self.warmup_fraction < 1:
      raise ValueError(
        f"learning_rate={self.learning_rate} must be > 0 and warmup_fraction="
        f"{self.warmup_fraction} in [0, 1)"
      )

  def model_config(self, tokenizer) -> ModelConfig:
    return ModelConfig(
      model_type="qwen2",
      vocab_size=tok_lib.model_vocab_size(tokenizer),
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      qkv_bias=True,
      tie_embeddings=False,
      max_position_embeddings=512,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_ids=(tokenizer.eos_token_id,),
      pad_token_id=tokenizer.pad_token_id,
    )


# -- data --------------------------------------------------------------------------------


def tokenize_examples(tokenizer, examples) -> tuple[list[np.ndarray], list[int]]:
  """Per example: the token ids (prompt + response) and the prompt length."""
  seqs, prompt_lens = [], []
  for problem, response, _ in examples:
    prompt = tok_lib.encode_prompt(tokenizer, problem.text)
    seqs.append(np.asarray(prompt + tok_lib.encode_response(tokenizer, response), np.int32))
    prompt_lens.append(len(prompt))
  return seqs, prompt_lens


def make_batch(seqs, prompt_lens, idx, pad_id: int, multiple: int) -> dict[str, np.ndarray]:
  """Right-padded tokens_BT, mask_BT (real tokens) and loss_BT (response targets, shifted:
  loss_BT[b, t] weighs predicting tokens_BT[b, t + 1])."""
  T = -(-max(len(seqs[i]) for i in idx) // multiple) * multiple
  tokens = np.full((len(idx), T), pad_id, np.int32)
  loss = np.zeros((len(idx), T), np.float32)
  mask = np.zeros((len(idx), T), bool)
  for r, i in enumerate(idx):
    n, p = len(seqs[i]), prompt_lens[i]
    tokens[r, :n] = seqs[i]
    mask[r, :n] = True
    loss[r, p - 1 : n - 1] = 1.0
  return {"tokens_BT": tokens, "mask_BT": mask, "loss_BT": loss}


def batch_order(lengths: list[int], batch_size: int, rng: np.random.Generator):
  """Endless batches of indices; each epoch is shuffled, then grouped by length within
  windows of 16 batches so padding stays small."""
  n = len(lengths)
  while True:
    perm = rng.permutation(n)
    batches = []
    window = 16 * batch_size
    for s in range(0, n - batch_size + 1, window):
      chunk = sorted(perm[s : s + window], key=lambda i: lengths[i])
      batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    for k in rng.permutation(len(batches)):
      yield batches[k]


# -- training ----------------------------------------------------------------------------


def response_loss(model: Transformer, batch) -> jax.Array:
  """Mean cross entropy over response targets (see the module docstring)."""
  tokens_BT, mask_BT = batch["tokens_BT"], batch["mask_BT"]
  logits_BTV = model(tokens_BT, positions_from_mask(mask_BT), mask_BT)
  targets_BT = jnp.roll(tokens_BT, -1, axis=1)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  w_BT = batch["loss_BT"]
  return jnp.sum(nll_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def make_optimizer(cfg: SftConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.learning_rate, int(cfg.warmup_fraction * cfg.steps), cfg.steps, cfg.learning_rate * 0.1
  )
  # Decay matrices only; norm scales and biases are left alone (the usual LM recipe).
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask),
  )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """A jitted (params, opt_state, batch) -> (params, opt_state, loss) over nnx.State."""

  def loss_fn(params, batch):
    return response_loss(nnx.merge(graphdef, params), batch)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train_sft(
  cfg: SftConfig, cot: task_lib.CotConfig, tokenizer, train_problems, seed: int, *, log=print,
  hook=None,
) -> tuple[Transformer, list]:  # fmt: skip
  """Trains from scratch on one verbose solution (`cot`) per training problem.

  Returns the model and the logged history [(step, loss, tokens_per_s)]. `hook(step, model)`,
  when given, is called at every logged step (e.g. to evaluate mid-run).
  """
  examples = task_lib.sft_examples(train_problems, cot, seed=seed)
  seqs, prompt_lens = tokenize_examples(tokenizer, examples)
  model = init_model(cfg.model_config(tokenizer), seed=seed)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(cfg)
  opt_state = tx.init(params)
  step_fn = make_train_step(graphdef, tx)
  batches = batch_order([len(s) for s in seqs], cfg.batch_size, np.random.default_rng(seed))
  history, t0, tokens = [], time.perf_counter(), 0
  for step in range(1, cfg.steps + 1):
    batch = make_batch(seqs, prompt_lens, next(batches), tokenizer.pad_token_id, cfg.pad_multiple)
    params, opt_state, loss = step_fn(params, opt_state, batch)
    tokens += int(batch["mask_BT"].sum())
    if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
      loss = float(loss)
      rate = tokens / (time.perf_counter() - t0)
      history.append((step, loss, rate))
      log(f"step {step:5d}  loss {loss:.4f}  tokens/s {rate:,.0f}")
      if hook is not None:
        hook(step, nnx.merge(graphdef, params))
  return nnx.merge(graphdef, params), history


def run_sft(plan, workdir, seed: int, log=print, evaluate_model: bool = False) -> dict:
  """Tokenizer, data splits and the SFT model under `workdir`: DIR/tokenizer/,
  DIR/data/{train,test}.jsonl, DIR/sft/ (written to sft.tmp/ and renamed, so sft/ exists
  only when complete) and DIR/sft_metrics.json, with the test evaluation when
  `evaluate_model` (the pipeline evaluates every model itself). `plan`: a toy.plan.ToyPlan."""
  workdir = pathlib.Path(workdir)
  cfg = plan.sft
  tokenizer = tok_lib.build_tokenizer(workdir / "tokenizer")
  train, test = task_lib.make_splits(plan.task, cfg.num_train, plan.num_test, seed=seed)
  write_splits(workdir / "data", train, test)
  t0 = time.perf_counter()
  model, history = train_sft(cfg, plan.cot, tokenizer, train, seed, log=log)
  train_s = time.perf_counter() - t0
  tmp = workdir / "sft.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  save_sft(model, workdir / "tokenizer", tmp)
  tmp.rename(workdir / "sft")
  metrics = {"steps": cfg.steps, "train_seconds": train_s, "final_loss": history[-1][1],
             "seed": seed, "config": dataclasses.asdict(cfg)}  # fmt: skip
  if evaluate_model:
    metrics.update(evaluate(
      model, tokenizer, test, temperature=plan.eval_temperature,
      max_new_tokens=plan.eval_max_new_tokens, seed=seed, decode=plan.decode,
    ))  # fmt: skip
  (workdir / "sft_metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
  return metrics


def main(argv=None) -> int:
  from egrc_jax.toy.plan import plan_of, toy_parser

  parser = toy_parser("python -m egrc_jax.toy.sft", __doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  plan = plan_of(args)
  workdir = pathlib.Path(args.workdir)
  if (workdir / "sft").exists():
    raise FileExistsError(f"{workdir / 'sft'} exists; pass a new --workdir")
  metrics = run_sft(plan, workdir, args.seed, evaluate_model=True)
  print(
    f"test accuracy {metrics['accuracy']:.3f}  mean length {metrics['mean_length']:.1f}"
    f" tokens (concise reference {metrics['concise_length']:.1f}, ratio"
    f" {metrics['length_ratio_to_concise']:.2f})  connector share"
    f" {metrics['connector_share']:.3f}  entropy at connectors"
    f" {metrics['entropy_at_connectors']:.3f} / elsewhere {metrics['entropy_elsewhere']:.3f}"
    f"  truncated {metrics['truncated']:.3f}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
