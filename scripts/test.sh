#!/usr/bin/env bash
# The README's test command: install (CPU wheels, plus libtpu's compiler for the AOT tests) and
# run the suite on 8 emulated devices.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[test,aot]"
ruff check egrc_jax tests configs
ruff format --check egrc_jax tests configs
python -m pytest -q -n 2 --dist loadgroup --durations=15 tests "$@"
