#!/usr/bin/env bash
# The README's main command: install, then the toy reproduction (see docs/toy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e .
python -m egrc_jax.demo
