"""egrc_jax: Entropy-Guided Reasoning Compression in JAX (see README.md)."""

__version__ = "0.1.0"
