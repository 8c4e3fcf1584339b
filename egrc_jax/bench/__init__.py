"""Benchmarks, one module each: `python -m egrc_jax.bench.<name> --help`."""
