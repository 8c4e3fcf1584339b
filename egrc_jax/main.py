"""Run an EGRC arm: `python -m egrc_jax.main --config=configs/<file>.py:<overrides> --workdir=DIR`.

Overrides after the colon are `key=value` pairs separated by commas (tuples use `+`), e.g.
`--config=configs/tiny.py:arm=ee,compress.steps=5`; `--config.key=value` flags work too.
An unknown key is an error. Re-running the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:overrides]")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and exports go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from egrc_jax import distributed

  distributed.maybe_initialize()
  from egrc_jax.trainer.loop import Trainer
  from egrc_jax.trainer.release import export_final

  config = _CONFIG.value
  workdir = _WORKDIR.value
  trainer = Trainer(config, workdir)
  results = trainer.run()
  if not results.get("preempted") and config.export.hf:
    results["hf_export"] = export_final(trainer, os.path.join(workdir, "hf_final"))
  print(json.dumps(results, indent=1, default=str))


def run():
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
  )
  app.run(main)


if __name__ == "__main__":
  run()
