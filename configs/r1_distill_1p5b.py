"""EGRC on DeepSeek-R1-Distill-Qwen-1.5B with the MATH training file: the paper-like defaults.

  python -m egrc_jax.main --config=configs/r1_distill_1p5b.py:model.hf_path=/ckpt/r1_distill_1p5b \\
      --workdir=gs://BUCKET/egrc/r1_distill_1p5b
  launch/tpu.sh run --name egrc --type v4-32 -- python -m egrc_jax.main \\
      --config=configs/r1_distill_1p5b.py:model.hf_path=... --workdir=gs://...

Arms: add `arm=ee|reverse|compress|enhance|grpo|baseline` (and `single.reward=...` for the
literature's rewards). Mesh for a v4-32 slice (16 chips): fsdp 16 (launch/README.md).
Shared settings: `egrc_jax.trainer.config.r1_distill_defaults`; every key: docs/config.md.
"""

from egrc_jax.trainer.config import base_config, finalize, r1_distill_defaults


def get_config(arg: str | None = None):
  c = r1_distill_defaults(base_config())
  c.model.preset = "r1_distill_1p5b"
  c.model.hf_path = ""  # set to the downloaded HF directory (weights + tokenizer)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.prompts_per_step = 128
  c.optim.micro_batch_rows = 16  # 1 row per device on fsdp 16 (docs/memory_plan.md)
  return finalize(c, arg)
