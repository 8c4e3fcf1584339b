"""EGRC on DeepSeek-R1-Distill-Qwen-7B with the MATH training file: the paper-like defaults.

  python -m egrc_jax.main --config=configs/r1_distill_7b.py:model.hf_path=/ckpt/r1_distill_7b \\
      --workdir=gs://BUCKET/egrc/r1_distill_7b
  launch/tpu.sh run --name egrc --type v4-32 -- python -m egrc_jax.main \\
      --config=configs/r1_distill_7b.py:model.hf_path=... --workdir=gs://...

Arms: add `arm=ee|reverse|compress|enhance|grpo|baseline` (and `single.reward=...` for the
literature's rewards). Mesh: tensor 4 x fsdp over the rest: fsdp 4 on a v4-32 (16 chips), fsdp 1
on a v5p-8 (4 chips, the smallest slice it was compiled for); every program fits at L = 8192
on both (docs/memory_plan.md, launch/README.md). `launch/tpu.sh run --type v5p-8 ...` runs it
unchanged.
Shared settings: `egrc_jax.trainer.config.r1_distill_defaults`; every key: docs/config.md.
"""

from egrc_jax.trainer.config import base_config, finalize, r1_distill_defaults


def get_config(arg: str | None = None):
  c = r1_distill_defaults(base_config())
  c.model.preset = "r1_distill_7b"
  c.model.hf_path = ""  # set to the downloaded HF directory (weights + tokenizer)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 4
  c.data.prompts_per_step = 64
  c.optim.micro_batch_rows = 4  # 1 row per data-parallel group of fsdp 4 x tensor 4
  return finalize(c, arg)
