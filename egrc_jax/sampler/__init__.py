"""Rollout sampler: jitted prefill + a `lax.while_loop` decode over an explicit KV cache,
lock-step or continuous (`SamplingConfig.loop`).

See docs/sampler.md. `generate(model, prompts, cfg, num_samples, seed, mesh)` is the entry
(`generate_state` over a split model); `continuous_rollout` adds the loop's stats.
"""

from egrc_jax.sampler.config import SamplingConfig
from egrc_jax.sampler.continuous import continuous_decode, continuous_rollout
from egrc_jax.sampler.generate import (
  TRACE_COUNTS,
  decode_loop,
  generate,
  generate_state,
  prefill,
  prepare_prompts,
  trace_counts,
)
from egrc_jax.sampler.rollout import (
  Rollout,
  completion_lists,
  decode_texts,
  grouped,
  prompt_lists,
  summary,
)
from egrc_jax.sampler.sampling import (
  Draw,
  StepStats,
  inverse_cdf_sample,
  policy_stats,
  sample_step,
  sampling_logits,
  token_stats,
  top_k_filter,
  top_p_filter,
)

__all__ = [
  "TRACE_COUNTS",
  "Draw",
  "StepStats",
  "Rollout",
  "SamplingConfig",
  "completion_lists",
  "continuous_decode",
  "continuous_rollout",
  "decode_loop",
  "decode_texts",
  "generate",
  "generate_state",
  "grouped",
  "inverse_cdf_sample",
  "policy_stats",
  "prefill",
  "prepare_prompts",
  "prompt_lists",
  "sample_step",
  "sampling_logits",
  "summary",
  "token_stats",
  "top_k_filter",
  "top_p_filter",
  "trace_counts",
]
