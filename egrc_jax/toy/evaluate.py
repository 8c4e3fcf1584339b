"""Accuracy and length of a toy model on held-out problems.

A response is correct when its final answer (the last \\boxed{} after </think>, as the
trainer grades it) is exactly the integer answer.
Lengths count generated tokens including the closing <eos> (a truncated response counts its
max_new_tokens and is wrong unless it boxed the right answer before the limit).
"""

from __future__ import annotations

import numpy as np

from egrc_jax.grading import extract_answer
from egrc_jax.sampler import SamplingConfig, completion_lists, generate
from egrc_jax.toy import task as task_lib
from egrc_jax.toy import tokenizer as tok_lib


def is_correct(text: str, answer: int) -> bool:
  """Exact integer match of the final answer, extracted as the trainer's grader does: the
  last box after `</think>` (the toy prompt opens the think block, so a response that never
  closes it has no answer). Never evaluates the text."""
  boxed = extract_answer(text, think_open=True)
  if boxed is None:
    return False
  boxed = boxed.strip()
  digits = boxed[1:] if boxed.startswith("-") else boxed
  return digits.isdigit() and int(boxed) == answer


def concise_length(tokenizer, problems: list[task_lib.Problem]) -> float:
  """Mean token count of the concise (steps-only) responses, <eos> included."""
  lengths = [len(tok_lib.encode_response(tokenizer, task_lib.concise_cot(p))) for p in problems]
  return float(np.mean(lengths))


def connector_ids(tokenizer) -> np.ndarray:
  return np.asarray([tokenizer.convert_tokens_to_ids(w) for w in task_lib.CONNECTORS])


def connector_share(tokenizer, completions: list[list[int]]) -> float:
  """Share of generated tokens that are connector words (task.CONNECTORS)."""
  ids = set(connector_ids(tokenizer).tolist())
  total = sum(len(c) for c in completions)
  hits = sum(t in ids for c in completions for t in c)
  return hits / max(total, 1)


def _mean(parts: list[np.ndarray]) -> float:
  """Mean over the concatenated parts; NaN when there is nothing to average."""
  x = np.concatenate(parts) if parts else np.zeros(0)
  return float(x.mean()) if x.size else float("nan")


def sampling_config(
  tokenizer, temperature: float, max_new_tokens: int, decode: dict | None = None
) -> SamplingConfig:
  """temperature 0 means greedy decoding; `decode`: the decode loop's settings
  (`trainer.plan.decode_loop_settings`; None: the sampler's defaults)."""
  return SamplingConfig(
    temperature=temperature if temperature > 0 else 1.0,
    greedy=temperature <= 0,
    max_new_tokens=max_new_tokens,
    stop_token_ids=(tokenizer.eos_token_id,),
    pad_id=tokenizer.pad_token_id,
    **(decode or {}),
  )


def evaluate(
  model, tokenizer, problems: list[task_lib.Problem], *, temperature: float,
  max_new_tokens: int, seed: int = 0, batch_size: int = 250, decode: dict | None = None,
) -> dict[str, float]:  # fmt: skip
  """One sample per problem (temperature 0: greedy): accuracy, mean length, truncation,
  connector share, mean policy entropy at connector tokens and elsewhere, and the concise
  reference length with the ratio to it."""
  prompts = [tok_lib.encode_prompt(tokenizer, p.text) for p in problems]
  cfg = sampling_config(tokenizer, temperature, max_new_tokens, decode)
  completions: list[list[int]] = []
  conn_entropy, other_entropy = [], []
  conn = connector_ids(tokenizer)
  for s in range(0, len(prompts), batch_size):
    rollout = generate(model, prompts[s : s + batch_size], cfg, seed=seed + s)
    completions += completion_lists(rollout)
    tokens, mask = np.asarray(rollout.completion_tokens_BC), np.asarray(rollout.completion_mask_BC)
    entropy = np.asarray(rollout.entropy_BC)
    is_conn = np.isin(tokens, conn)
    conn_entropy.append(entropy[mask & is_conn])
    other_entropy.append(entropy[mask & ~is_conn])
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
    # The policy's (T = 1) entropy of the step that emitted a connector vs any other token.
    "entropy_at_connectors": _mean(conn_entropy),
    "entropy_elsewhere": _mean(other_entropy),
    "concise_length": ref,
    "length_ratio_to_concise": mean_len / ref,
    "num_problems": len(problems),
    "temperature": temperature,
    "example": texts[0],
  }
