"""The most frequent strings among the high-entropy tokens, and their connector share [paper,
Fig. 3e].

High-entropy tokens: the top rho fraction of all response tokens by entropy
(`losses.high_entropy_mask`: k = ceil(rho * n), every token at or above the k-th largest
entropy). A token's string is its decoded text, stripped and lower-cased (whitespace-only
tokens show as "\\n" or "<sp>"). Connector share = high-entropy tokens whose string is in the
connector list / all high-entropy tokens. Entropies come from samples.jsonl written with
`evaluate --save_token_entropy` (untempered T = 1 policy entropy), or from fresh samples.
"""

from __future__ import annotations

import collections
import math

import jax.numpy as jnp
import numpy as np

from egrc_jax import losses
from egrc_jax.analysis import common, sampling


def token_string(text: str) -> str:
  s = text.strip().lower()
  if s:
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")
  return "\\n" if "\n" in text else "<sp>"


def high_entropy_counts(strings: list[str], entropy, rho: float, connectors) -> dict:
  """Counts of the strings of the top-rho entropy tokens and the connector share."""
  if len(strings) != len(entropy) or not strings:
    raise ValueError(f"need one entropy per token string, got {len(strings)} and {len(entropy)}")
  ent = jnp.asarray(np.asarray(entropy, np.float32))[None]
  high = np.asarray(losses.high_entropy_mask(ent, jnp.ones(ent.shape, bool), rho))[0]
  chosen = [s for s, h in zip(strings, high, strict=True) if h]
  counts = collections.Counter(chosen)
  conn = set(connectors)
  n_conn = sum(c for s, c in counts.items() if s in conn)
  all_counts = collections.Counter(strings)
  return {
    "rho": rho,
    "num_tokens": len(strings),
    "num_high": len(chosen),
    "threshold": float(np.min(np.asarray(entropy)[high])),
    "connector_share": n_conn / len(chosen),
    "connector_share_all_tokens": sum(all_counts[s] for s in conn) / len(strings),
    "counts": counts.most_common(),
  }


def word_cloud(counts: list[tuple[str, int]], path, title: str, connectors=(), top: int = 60):
  """Words placed on a spiral, font size ~ sqrt(frequency), connectors in red; no overlap
  (each word's rendered box is checked against the placed ones)."""
  plt = common.pyplot()
  fig = plt.figure(figsize=(10, 6))
  ax = fig.add_axes((0, 0, 1, 0.92))
  ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.axis("off")
  fig.suptitle(title)
  renderer = fig.canvas.get_renderer()
  placed = []
  top_counts = counts[:top]
  biggest = top_counts[0][1] if top_counts else 1
  conn = set(connectors)
  for word, count in top_counts:
    size = 8 + 40 * math.sqrt(count / biggest)
    color = "tab:red" if word in conn else "tab:blue"
    text = ax.text(0.5, 0.5, word, fontsize=size, color=color, ha="center", va="center")
    for step in range(2000):
      angle, radius = 0.35 * step, 0.0025 * step
      x, y = 0.5 + radius * math.cos(angle), 0.5 + 0.6 * radius * math.sin(angle)
      if not (0.02 < x < 0.98 and 0.02 < y < 0.98):
        continue
      text.set_position((x, y))
      box = text.get_window_extent(renderer).expanded(1.05, 1.1)
      if all(not box.overlaps(b) for b in placed) and 0 <= box.x0 and box.x1 <= fig.bbox.x1:
        placed.append(box)
        break
    else:
      text.remove()  # no room left for this word
  fig.savefig(path, dpi=110)
  plt.close(fig)


def strings_from_samples(records: list[dict], tokenizer) -> tuple[list[str], list[float]]:
  strings, entropy = [], []
  for r in records:
    if "token_ids" not in r:
      raise ValueError(
        f"sample {r['benchmark']}/{r['id']}#{r['sample']} has no token entropies: re-run "
        "`python -m egrc_jax.evaluate` with --save_token_entropy, or pass --model"
      )
    strings += [token_string(tokenizer.decode([t])) for t in r["token_ids"]]
    entropy += list(r["token_entropy"])
  return strings, entropy


def run_from_strings(strings, entropy, out: str, rho: float, connectors, source: str) -> dict:
  d = common.out_dir(out)
  summary = high_entropy_counts(strings, entropy, rho, connectors)
  summary.update(source=source, connectors=list(connectors))
  common.write_csv(d / "high_entropy_tokens.csv",
                   [{"string": s, "count": c} for s, c in summary["counts"]])  # fmt: skip
  common.write_json(d / "high_entropy_tokens.json", summary)
  word_cloud(summary["counts"], d / "high_entropy_tokens.png",
             f"top {rho:.0%} entropy tokens: connector share {summary['connector_share']:.1%}",
             connectors)  # fmt: skip
  return summary


def run_samples(samples: str, tokenizer_dir: str, out: str, rho: float, connectors,
                benchmark: str | None = None) -> dict:  # fmt: skip
  """From an evaluation's samples.jsonl (saved with --save_token_entropy)."""
  from egrc_jax.data.chat import load_tokenizer
  from egrc_jax.evaluate import model_io

  settings = common.eval_settings(samples)
  tok_dir = tokenizer_dir or settings.get("tokenizer") or ""
  if not tok_dir and settings.get("model"):
    # The evaluated model's own tokenizer: a trainer workdir keeps it in hf_final/.
    try:
      found = model_io.resolve(settings["model"]).tokenizer_dir
    except FileNotFoundError:
      found = None
    tok_dir = str(found or settings["model"])
  if not tok_dir:
    raise ValueError("pass --tokenizer (the evaluation records no model directory)")
  try:
    tokenizer = load_tokenizer(tok_dir)
  except (OSError, ValueError):
    raise ValueError(f"no tokenizer in {tok_dir!r}; pass --tokenizer=<directory>") from None
  strings, entropy = strings_from_samples(common.load_samples(samples, benchmark), tokenizer)
  return run_from_strings(strings, entropy, out, rho, connectors, str(samples))


def run_model(
  model: str, prompts: str, out: str, rho: float, connectors,
  settings: sampling.SampleSettings, data_root: str, tokenizer: str = "",
) -> dict:  # fmt: skip
  """From fresh samples of `model` (untempered entropies from the sampler)."""
  _, tok, _, rollout, _, _ = sampling.sample_and_grade(model, prompts, settings, data_root,
                                                        tokenizer)  # fmt: skip
  mask = sampling.host(rollout.completion_mask_BC)
  tokens = sampling.host(rollout.completion_tokens_BC)[mask]
  entropy = sampling.host(rollout.entropy_BC)[mask]
  strings = [token_string(tok.decode([int(t)])) for t in tokens]
  return run_from_strings(strings, entropy.tolist(), out, rho, connectors, model)
