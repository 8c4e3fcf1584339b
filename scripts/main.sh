#!/usr/bin/env bash
# The README's main command: install, then the toy reproduction (see docs/toy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[hf]"  # torch: the report loads the export in transformers
# SFT, the RL arms (EGRC, EE, reverse order; compress-only = EGRC's stage 1), evaluation and
# runs/toy/report.md; one seed, about 10 minutes on 2 CPU cores (plus the install). Re-running resumes.
# The 3-seed figures: python -m egrc_jax.toy.pipeline --workdir=runs/toy3 --seeds=0,1,2
python -m egrc_jax.toy.pipeline --workdir=runs/toy --seeds=0
