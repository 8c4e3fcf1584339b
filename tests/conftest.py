"""Test setup: 8 emulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"benchmark data not found at {SHARED_DATA}")
  return SHARED_DATA


# Identical computations (every arm's train step, every test's sampler) compile once per
# test session: XLA's persistent cache works on CPU and is keyed by the HLO.
import jax  # noqa: E402

jax.config.update(
  "jax_compilation_cache_dir", os.environ.get("EGRC_JAX_CACHE", "/tmp/egrc_jax_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
