"""The miniature EGRC reproduction on the synthetic arithmetic task (docs/toy.md).

  python -m egrc_jax.toy.pipeline --workdir=runs/toy            # SFT, arms, report (main job)
  python -m egrc_jax.toy.pipeline --config=configs/toy.py:quick --workdir=/tmp/toy_quick
  python -m egrc_jax.main --config=configs/toy.py:model.hf_path=runs/toy/seed0/sft,\\
      data.train_source=runs/toy/seed0/data/train.jsonl,\\
      data.eval_source=runs/toy/seed0/data/test.jsonl --workdir=runs/toy/egrc_by_hand

One config for every toy command: the trainer's keys (the RL arms), plus the sections sft
(the warm start), task and cot (the problems and their verbose solutions) and pipeline
(seeds, the report's extras), each declared by its dataclass (egrc_jax/toy/plan.py); the
`eval` section is the evaluation of every model and the exported generation config.
Presets, named first in the arg: `quick` (the test's shortened pipeline). The pipeline fills
model.hf_path and the data paths of each arm.
"""

from egrc_jax.toy.plan import PRESETS, PipelineConfig
from egrc_jax.toy.sft import SftConfig
from egrc_jax.toy.task import CONNECTORS, CotConfig, TaskConfig
from egrc_jax.trainer.config import base_config, dataclass_section, finalize, split_presets


def get_config(arg: str | None = None):
  presets, overrides = split_presets(arg, PRESETS)
  c = base_config()
  c.model.hf_path = ""  # the SFT model (set by the pipeline or on the command line)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.train_source = ""  # toy train JSONL ({id, problem, answer})
  c.data.train_gold_rule = "answer"
  c.data.eval_source = ""  # toy test JSONL
  c.data.eval_gold_rule = "answer"
  c.data.instruction = ""  # the toy chat template carries the task format
  c.data.prompts_per_step = 16
  c.data.max_prompt_tokens = 32
  c.rollout.num_samples = 8
  c.rollout.max_new_tokens = 192  # L
  c.rollout.prompt_buckets = (32,)
  c.grading.mode = "exact"
  c.compress.steps = 40
  c.compress.temperature = 0.8  # T1 < T2; stage 1 also removes most of the T = 1 sampling noise
  c.compress.r = 0.05  # f(L) = 0.05: a strong length pressure
  c.enhance.steps = 40
  c.enhance.temperature = 1.0
  c.enhance.w_len = 0.15
  c.loss.kl_kind = "k3"  # GRPO's KL estimator ...
  c.enhance.kl_coef = 0.05  # ... to the SFT model, in stage 2 only (stage 1 has no KL term)
  c.single.steps = 80  # EE gets both stages' budget
  c.single.temperature = 0.6
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 2
  c.optim.weight_decay = 0.0
  # Gradient micro-batches of 8 learner rows (~1,800 slots): their activations stay in a
  # CPU's caches: 1.7x faster per step than one micro-batch of every row
  # (`python -m egrc_jax.bench.learner --cases toy [--micro-batch-rows 0]`, docs/trainer.md).
  c.optim.micro_batch_rows = 8
  c.checkpoint.every = 20
  # The evaluation of every model (the pipeline's table, SFT's, the trainer's stage ends) and
  # the exported generation config: the paper's temperature, one sample per problem.
  c.eval.num_prompts = 500  # held-out test problems (also the size of the test split)
  c.eval.temperature = 0.6
  c.eval.top_p = 1.0
  c.eval.max_new_tokens = 448  # the same budget for every model (prompt <= 32 + 448 <= 512)
  c.log.tensorboard = False
  c.log.connectors = CONNECTORS  # the toy's connector words, as its evaluation counts them
  # The toy's own sections (keys and comments: the dataclasses in egrc_jax/toy).
  c.sft = dataclass_section(SftConfig())
  c.task = dataclass_section(TaskConfig())
  c.cot = dataclass_section(CotConfig())
  c.pipeline = dataclass_section(PipelineConfig())
  for name in presets:
    PRESETS[name](c)
  return finalize(c, overrides)
