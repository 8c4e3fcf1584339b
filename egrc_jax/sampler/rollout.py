"""The sampler's output pytree and host-side helpers over it.

Shape letters: B rows (= P prompts x G samples, prompt-major: row p*G + g), Tp padded prompt
length (the bucket), C completion budget (max_new_tokens).
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class Rollout:
  """G completions for each of P prompts.

  prompt_tokens_BTp: int32, left padded with pad_id; prompt_mask_BTp: True on real tokens.
  completion_tokens_BC: int32, pad_id after the stop; completion_mask_BC: True on generated
  tokens up to and including the stop token. lengths_B = completion_mask.sum(-1).
  truncated_B: the row spent the budget without emitting a stop token.
  logprobs_BC: log q(token) under the sampling distribution (temperature / top-k / top-p;
  0 when greedy). policy_logprobs_BC: log p(token) under the untempered policy (T = 1, no
  filter). entropy_BC: -sum_v p_v log p_v of the untempered policy. tempered_logprobs_BC
  and tempered_entropy_BC: the same of p_T = softmax(logits / T), the sampling temperature
  without the filters (what the learner recomputes; equal to logprobs_BC when no filter is
  on; at T = 1 when greedy). All five are 0 where completion_mask is False.
  prompt_index_B: which input prompt a row answers (row // G). num_samples: G (static).
  """

  prompt_tokens_BTp: jax.Array
  prompt_mask_BTp: jax.Array
  completion_tokens_BC: jax.Array
  completion_mask_BC: jax.Array
  lengths_B: jax.Array
  truncated_B: jax.Array
  logprobs_BC: jax.Array
  policy_logprobs_BC: jax.Array
  entropy_BC: jax.Array
  tempered_logprobs_BC: jax.Array
  tempered_entropy_BC: jax.Array
  prompt_index_B: jax.Array
  num_samples: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def batch_size(self) -> int:
    return self.completion_tokens_BC.shape[0]

  def full_sequence(self):
    """(tokens [B, Tp + C], mask [B, Tp + C]): prompt then completion, for teacher forcing."""
    tokens = jax.numpy.concatenate([self.prompt_tokens_BTp, self.completion_tokens_BC], 1)
    mask = jax.numpy.concatenate([self.prompt_mask_BTp, self.completion_mask_BC], 1)
    return tokens, mask


def completion_lists(rollout: Rollout) -> list[list[int]]:
  """Each row's generated token ids (including the stop token) as host lists."""
  tokens = np.asarray(rollout.completion_tokens_BC)
  lengths = np.asarray(rollout.lengths_B)
  return [tokens[b, : lengths[b]].tolist() for b in range(tokens.shape[0])]


def prompt_lists(rollout: Rollout) -> list[list[int]]:
  """Each row's prompt token ids without the left padding."""
  tokens = np.asarray(rollout.prompt_tokens_BTp)
  mask = np.asarray(rollout.prompt_mask_BTp)
  return [tokens[b, mask[b]].tolist() for b in range(tokens.shape[0])]


def decode_texts(rollout: Rollout, tokenizer, skip_special_tokens: bool = True) -> list[str]:
  """Completion texts, one per row, through any tokenizer with a `decode(ids, ...)` method
  (a `transformers` tokenizer, or the toy task's)."""
  return [
    tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    for ids in completion_lists(rollout)
  ]


def grouped(values, num_samples: int) -> list[list]:
  """Split a length-B sequence into P lists of G (rows are prompt-major)."""
  values = list(values)
  if len(values) % num_samples:
    raise ValueError(f"{len(values)} rows do not split into groups of {num_samples}")
  return [values[i : i + num_samples] for i in range(0, len(values), num_samples)]


def summary(rollout: Rollout) -> dict[str, float]:
  """Host scalars for logging: mean length, truncation rate, token-mean entropy."""
  mask = np.asarray(rollout.completion_mask_BC)
  n = max(int(mask.sum()), 1)
  return {
    "mean_length": float(np.asarray(rollout.lengths_B).mean()),
    "truncated_frac": float(np.asarray(rollout.truncated_B).mean()),
    "mean_entropy": float((np.asarray(rollout.entropy_BC) * mask).sum() / n),
    "mean_policy_logprob": float((np.asarray(rollout.policy_logprobs_BC) * mask).sum() / n),
  }
