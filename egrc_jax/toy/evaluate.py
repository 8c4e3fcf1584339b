"""Accuracy and length of a toy model on held-out problems.

A response is correct when the content of its last \\boxed{} is exactly the integer answer.
Lengths count generated tokens including the closing <eos> (a truncated response counts its
max_new_tokens and is wrong unless it boxed the right answer before the limit).
"""

from __future__ import annotations

import numpy as np

from egrc_jax.data.gold import last_boxed_content
from egrc_jax.toy import task as task_lib
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.decode import sample


def is_correct(text: str, answer: int) -> bool:
  """Exact integer match of the last boxed content (never evaluates the text)."""
  boxed = last_boxed_content(text)
  if boxed is None:
    return False
  boxed = boxed.strip()
  digits = boxed[1:] if boxed.startswith("-") else boxed
  return digits.isdigit() and int(boxed) == answer


def concise_length(tokenizer, problems: list[task_lib.Problem]) -> float:
  """Mean token count of the concise (steps-only) responses, <eos> included."""
  lengths = [len(tok_lib.encode_response(tokenizer, task_lib.concise_cot(p))) for p in problems]
  return float(np.mean(lengths))


def connector_share(tokenizer, completions: list[list[int]]) -> float:
  """Share of generated tokens that are connector words (task.CONNECTORS)."""
  connector_ids = {tokenizer.convert_tokens_to_ids(w) for w in task_lib.CONNECTORS}
  total = sum(len(c) for c in completions)
  hits = sum(t in connector_ids for c in completions for t in c)
  return hits / max(total, 1)


def evaluate(
  model, tokenizer, problems: list[task_lib.Problem], *, temperature: float,
  max_new_tokens: int, seed: int = 0, batch_size: int = 250,
) -> dict[str, float]:  # fmt: skip
  """One sample per problem: accuracy, mean length, truncation, connector share, and the
  concise reference length with the ratio to it."""
  prompts = [tok_lib.encode_prompt(tokenizer, p.text) for p in problems]
  completions: list[list[int]] = []
  for s in range(0, len(prompts), batch_size):
    completions += sample(
      model, prompts[s : s + batch_size], max_new_tokens=max_new_tokens,
      temperature=temperature, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
      seed=seed + s,
    )  # fmt: skip
  texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
  correct = [is_correct(t, p.answer) for t, p in zip(texts, problems, strict=True)]
  lengths = [len(c) for c in completions]
  truncated = [tokenizer.eos_token_id not in c for c in completions]
  ref = concise_length(tokenizer, problems)
  mean_len = float(np.mean(lengths))
  return {
    "accuracy": float(np.mean(correct)),
    "mean_length": mean_len,
    "truncated": float(np.mean(truncated)),
    "connector_share": connector_share(tokenizer, completions),
    "concise_length": ref,
    "length_ratio_to_concise": mean_len / ref,
    "num_problems": len(problems),
    "temperature": temperature,
    "example": texts[0],
  }
