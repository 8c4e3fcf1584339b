"""A tiny random-init model on the MATH training file: the whole RL loop in a minute on CPU.

  python -m egrc_jax.main --config=configs/tiny.py --workdir=/tmp/egrc_tiny
  python -m egrc_jax.main --config=configs/tiny.py:arm=ee --workdir=/tmp/egrc_tiny_ee

A random model answers nothing correctly, so rewards are mostly zero: this config checks the
machinery (every arm, switching, checkpoints, metrics), not learning. The toy config
(configs/toy.py) shows learning.
"""

from egrc_jax.trainer.config import base_config, finalize


def get_config(arg: str | None = None):
  c = base_config()
  c.model.preset = "tiny"
  c.model.tokenizer_path = "bytes"
  c.mesh.fsdp = -1
  c.data.prompts_per_step = 8
  c.data.max_prompt_tokens = 512
  c.data.on_bad_row = "skip"
  c.rollout.num_samples = 4
  c.rollout.max_new_tokens = 16
  c.rollout.prompt_buckets = (256, 512)
  c.grading.mode = "math"
  c.grading.workers = 1
  c.compress.steps = 3
  c.enhance.steps = 3
  c.single.steps = 3
  c.single.n_target = 8
  c.single.buffer = 4
  c.switch.min_steps = 2
  c.switch.window = 1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 1
  c.optim.micro_batch_rows = 16
  c.checkpoint.every = 2
  c.eval.num_prompts = 8
  c.eval.temperature = 1.0
  c.eval.top_p = 1.0
  c.log.tensorboard = False
  return finalize(c, arg)
