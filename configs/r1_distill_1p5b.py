"""EGRC on DeepSeek-R1-Distill-Qwen-1.5B with the MATH training file: the paper-like defaults.

  python -m egrc_jax.main --config=configs/r1_distill_1p5b.py:model.hf_path=/ckpt/r1-1.5b \\
      --workdir=gs://BUCKET/egrc/r1_1p5b
  launch/tpu.sh run --name egrc --type v4-32 -- python -m egrc_jax.main \\
      --config=configs/r1_distill_1p5b.py:model.hf_path=... --workdir=gs://...

Arms: add `arm=ee|reverse|compress|enhance|grpo|baseline` (and `single.reward=...` for the
literature's rewards). Mesh for a v4-32 slice (16 chips): fsdp 16 (launch/README.md).
Every [ours] value of EGRC.md is a key here; see docs/config.md.
"""

from egrc_jax.trainer.config import base_config, finalize


def get_config(arg: str | None = None):
  c = base_config()
  c.model.preset = "r1_distill_1p5b"
  c.model.hf_path = ""  # set to the downloaded HF directory (weights + tokenizer)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.prompts_per_step = 128
  c.data.max_prompt_tokens = 1024
  c.data.eval_benchmark = "math500"
  c.rollout.num_samples = 8
  c.rollout.max_new_tokens = 8192  # L
  c.rollout.prompt_buckets = (256, 512, 1024)
  c.grading.workers = 8
  c.grading.timeout_s = 10.0
  c.compress.steps = 200
  c.enhance.steps = 200
  c.single.steps = 400  # EE / baselines get both stages' budget
  c.single.n_target = 4096
  c.single.buffer = 1024
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.micro_batch_rows = 64
  c.checkpoint.every = 20
  c.eval.every = 50
  c.eval.num_prompts = 500
  c.eval.num_samples = 4
  return finalize(c, arg)
