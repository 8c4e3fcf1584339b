"""`python -m egrc_jax.plan ...`: print (and optionally save) a memory plan."""

import sys

from egrc_jax.plan.cli import main

sys.exit(main())
