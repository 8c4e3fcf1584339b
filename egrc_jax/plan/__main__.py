"""`python -m egrc_jax.plan ...`: print (and optionally save) a memory plan, or compile the
run's programs for a TPU slice (`--compile`)."""

import os
import sys

# libtpu (the --compile path) must never ask a cloud metadata server for its topology, and
# JAX keeps the CPU as its default backend: the TPU devices here are compile-only.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])

from egrc_jax import cli  # noqa: E402
from egrc_jax.plan.cli import main  # noqa: E402

sys.exit(cli.run(main))
