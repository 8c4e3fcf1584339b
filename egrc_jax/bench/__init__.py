"""Micro-benchmarks: `python -m egrc_jax.bench.<name>`."""
