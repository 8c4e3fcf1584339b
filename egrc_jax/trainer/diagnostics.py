"""Per-step rollout statistics: accuracy, lengths, and where the entropy sits.

Host-side numpy over the sampler's output. Shape letters: B rows, C completion length.
"""

from __future__ import annotations

import numpy as np

from egrc_jax import losses


def connector_token_ids(tokenizer, words) -> np.ndarray:
  """Ids of the single-token spellings of the connector words ("wait", " Wait", ...)."""
  ids = set()
  for w in words:
    for form in (w, " " + w, w.capitalize(), " " + w.capitalize()):
      toks = tokenizer.encode(form, add_special_tokens=False)
      if len(toks) == 1:
        ids.add(int(toks[0]))
  return np.array(sorted(ids), np.int32)


def rollout_metrics(rollout, correct_B, connector_ids, rho: float) -> dict[str, float]:
  lengths = np.asarray(rollout.lengths_B)
  mask = np.asarray(rollout.completion_mask_BC).astype(bool)
  ent = np.asarray(rollout.entropy_BC)
  tokens = np.asarray(rollout.completion_tokens_BC)
  valid = ent[mask]
  is_conn = np.isin(tokens, connector_ids) & mask
  high = np.asarray(losses.high_entropy_mask(ent, mask, rho)) if mask.any() else mask
  mean_or_nan = lambda x: float(x.mean()) if x.size else float("nan")
  return {
    "accuracy": float(np.mean(correct_B)),
    "length/mean": float(lengths.mean()),
    "length/p50": float(np.percentile(lengths, 50)),
    "length/p90": float(np.percentile(lengths, 90)),
    "length/truncation_rate": float(np.asarray(rollout.truncated_B).mean()),
    "length/correct_mean": mean_or_nan(lengths[np.asarray(correct_B, bool)]),
    "entropy/mean": mean_or_nan(valid),
    # The entropy at the sampling temperature (p_T, no filter), a plain mean over every
    # completion token: the same token population in every stage.
    "entropy/at_temperature": mean_or_nan(np.asarray(rollout.tempered_entropy_BC)[mask]),
    "entropy/connector_mean": mean_or_nan(ent[is_conn]),
    "entropy/other_mean": mean_or_nan(ent[mask & ~is_conn]),
    "entropy/high_connector_share": float(is_conn[high].mean()) if high.any() else float("nan"),
    "entropy/connector_token_share": float(is_conn.sum() / max(mask.sum(), 1)),
  }
