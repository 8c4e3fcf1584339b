"""EGRC on DeepSeek-R1-Distill-Qwen-1.5B with the MATH training file: the paper-like defaults.

  python -m egrc_jax.main --config=configs/r1_distill_1p5b.py:model.hf_path=/ckpt/r1_distill_1p5b \\
      --workdir=gs://BUCKET/egrc/r1_distill_1p5b
  launch/tpu.sh run --name egrc --type v4-32 -- python -m egrc_jax.main \\
      --config=configs/r1_distill_1p5b.py:model.hf_path=... --workdir=gs://...
  launch/tpu.sh run --name egrc --type v6e-8 -- python -m egrc_jax.main \\
      --config=configs/r1_distill_1p5b.py:v6e8,model.hf_path=... --workdir=gs://...

Arms: add `arm=ee|reverse|compress|enhance|grpo|baseline` (and `single.reward=...` for the
literature's rewards). Mesh: fsdp over every chip (16 on a v4-32; 8 on a v6e-8 with the
`v6e8` preset: one learner row per chip); every program compiled for both slices and fitting
at L = 8192: docs/memory_plan.md, launch/README.md.
Shared settings: `egrc_jax.trainer.config.r1_distill_defaults`; every key: docs/config.md.
"""

from egrc_jax.trainer.config import base_config, finalize, r1_distill_defaults, split_presets


def v6e8(c):
  """A v6e-8 (8 chips of 32 GB): one learner row per chip (the train step: 23.91 of 31.25 GiB
  per chip in libtpu's compile)."""
  c.optim.micro_batch_rows = 8


PRESETS = {"v6e8": v6e8}


def get_config(arg: str | None = None):
  presets, overrides = split_presets(arg, PRESETS)
  c = r1_distill_defaults(base_config())
  c.model.preset = "r1_distill_1p5b"
  c.model.hf_path = ""  # set to the downloaded HF directory (weights + tokenizer)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.prompts_per_step = 128
  c.optim.micro_batch_rows = 16  # 1 row per device on fsdp 16 (docs/memory_plan.md)
  for name in presets:
    PRESETS[name](c)
  return finalize(c, overrides)
