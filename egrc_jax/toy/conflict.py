"""Entropy-conflict diagnostics of a toy model: the Fig. 3a and Fig. 3d analogues.

    python -m egrc_jax.toy.conflict --workdir=runs/conflict_design/seed0 \\
        --config=configs/toy.py:conflict [--model=sft|ARM] [--prompts=100] [--out=DIR]

On G samples of each of P held-out problems (the stage-1 rollout settings: G =
rollout.num_samples, T = compress.temperature, L = rollout.max_new_tokens), the two objectives
EGRC separates in time act on the same samples. Shape letters: P problems, G samples per
problem, B = P * G rows, C completion budget, K connector words.

  compression (stage 1):  R = c * f(|y|), f(x) = exp(-lambda x), f(L) = compress.r, R = 0
                          when truncated; A = R (absolute, positive-only)
  accuracy (stage 2's):   A = (c - mean_G c) / (std_G c + 1e-6)   (GRPO on correctness)

Fig. 3a analogue (which samples each objective prefers): the length, mean entropy and
re-check count of the samples each objective selects (compression: R > 0, weighted by R;
accuracy: c = 1), and how correctness goes with length inside a group: the within-group
Pearson r of (length, c) and the accuracy of each group's shorter half against its longer
half. When short samples are less often correct, the compression objective prefers samples
the accuracy objective does not.

Fig. 3d analogue (the gradients at connector tokens): per response token t, with p_t the
policy at the sampling temperature and a_t the sampled token,
  H_t = -sum_v p_t(v) log p_t(v)
  g_t = |A| * ||e_{a_t} - p_t||_2          (the norm of the objective's logit gradient)
  s_t = A * sum_{k in connectors} (1[a_t = k] - p_t(k))
        (d/dz of A log p_t(a_t), summed over the connector words' logits: > 0 raises the
         connectors' probability at t, < 0 lowers it)
Reported per objective: Pearson r(H, g) over all response tokens and over the tokens with
A != 0 (and over all with the sampler's T = 1 entropy for H); the mean of s_t over all
response tokens, and that mean divided by the mean |A| (so
that the two objectives' scales compare). Opposite signs of s under the two objectives are
the entropy conflict of the paper: one objective pushes connectors down, the other up.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax import cli
from egrc_jax.analysis import entropy_grad
from egrc_jax.data.chat import load_tokenizer
from egrc_jax.model import positions_from_mask
from egrc_jax.sampler import completion_lists, generate
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.evaluate import connector_ids, is_correct, sampling_config

OBJECTIVES = (("compression", "egrc_compress"), ("accuracy", "grpo"))


@nnx.jit(static_argnames=("prompt_len",))
def _tempered_probs(model, tokens_BS, mask_BS, prompt_len: int, temperature):
  """softmax(logits / T) [B, C, V] of the completion positions (position t predicts t + 1)."""
  logits_BSV = model(tokens_BS, positions_from_mask(mask_BS), mask_BS)
  return jax.nn.softmax(logits_BSV[:, prompt_len - 1 : -1].astype(jnp.float32) / temperature, -1)


def token_arrays(model, rollout, temperature: float) -> dict[str, np.ndarray]:
  """Per completion token [B, C]: the sampled id, validity, and p_t of the tempered policy
  recomputed by teacher forcing (the toy vocabulary is small, so [B, C, V] fits)."""
  tokens_BS, mask_BS = rollout.full_sequence()
  Tp = rollout.prompt_tokens_BTp.shape[1]
  p_BCV = np.asarray(_tempered_probs(model, tokens_BS, mask_BS, Tp, temperature))
  return {
    "tokens_BC": np.asarray(rollout.completion_tokens_BC),
    "mask_BC": np.asarray(rollout.completion_mask_BC, bool),
    "p_BCV": p_BCV,
  }


def token_statistics(p_BCV, tokens_BC) -> dict[str, np.ndarray]:
  """H_t, ||e_{a_t} - p_t|| and p_t(a_t) [B, C] from the tempered distribution."""
  p = np.asarray(p_BCV, np.float64)
  pa = np.take_along_axis(p, tokens_BC[..., None], -1)[..., 0]
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
  dist = np.sqrt(np.maximum(1.0 - 2.0 * pa + np.sum(p * p, -1), 0.0))
  return {"entropy_BC": entropy, "dist_BC": dist, "p_a_BC": pa}


def connector_gradient(adv_B, p_BCV, tokens_BC, mask_BC, conn_K) -> dict[str, float]:
  """s_t = A * sum_k (1[a_t = k] - p_t(k)) over the connector ids conn_K (module docstring):
  its mean over the valid tokens and that mean divided by the mean |A| over them."""
  p_conn_BC = np.asarray(p_BCV, np.float64)[..., np.asarray(conn_K)].sum(-1)
  is_conn_BC = np.isin(tokens_BC, conn_K)
  s_BC = np.asarray(adv_B, np.float64)[:, None] * (is_conn_BC - p_conn_BC)
  m = np.asarray(mask_BC, bool)
  abs_a = np.broadcast_to(np.abs(np.asarray(adv_B, np.float64))[:, None], m.shape)[m]
  mean_s = float(s_BC[m].mean()) if m.any() else float("nan")
  scale = float(abs_a.mean()) if m.any() else 0.0
  return {
    "connector_grad_mean": mean_s,
    "connector_grad_per_abs_adv": mean_s / scale if scale > 0 else float("nan"),
  }


def within_group(lengths_PG, correct_PG) -> dict[str, float]:
  """How correctness goes with length inside a group: the Pearson r of (length, c) after
  removing each group's means, over the groups where both vary; and the accuracy of each
  group's shorter half against its longer half (by length, ties broken by sample index)."""
  L = np.asarray(lengths_PG, float)
  c = np.asarray(correct_PG, float)
  Lc, cc = L - L.mean(1, keepdims=True), c - c.mean(1, keepdims=True)
  keep = (L.std(1) > 0) & (c.std(1) > 0)
  denom = np.sqrt((Lc[keep] ** 2).sum() * (cc[keep] ** 2).sum())
  r = float((Lc[keep] * cc[keep]).sum() / denom) if keep.any() and denom > 0 else float("nan")
  order = np.argsort(L, axis=1, kind="stable")
  half = L.shape[1] // 2
  c_sorted = np.take_along_axis(c, order, 1)
  nan = float("nan")
  return {
    "length_correct_r": r,
    "groups_varying": int(keep.sum()),
    "accuracy_shorter_half": float(c_sorted[:, :half].mean()) if half else nan,
    "accuracy_longer_half": float(c_sorted[:, L.shape[1] - half :].mean()) if half else nan,
  }


def _wmean(x, w) -> float:
  x, w = np.asarray(x, float), np.asarray(w, float)
  return float((x * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


def selected(w, lengths_B, entropy_B, checks_B) -> dict:
  """Fig. 3a numbers of one objective: the samples it selects (weight w > 0: R for the
  compression objective, c for the accuracy one) and their weighted means."""
  return {
    "selected": int((w > 0).sum()),
    "mean_tokens": _wmean(lengths_B, w),
    "mean_entropy": _wmean(entropy_B, w),
    "mean_rechecks": _wmean(checks_B, w),
  }


def diagnose(model, tokenizer, problems, *, num_samples: int, temperature: float,
             max_new_tokens: int, r: float, seed: int = 0, decode: dict | None = None,
             out_dir=None) -> dict:  # fmt: skip
  """The module docstring's numbers for `model` on `problems` (plots under out_dir if given)."""
  G = num_samples
  prompts = [tok_lib.encode_prompt(tokenizer, p.text) for p in problems]
  cfg = sampling_config(tokenizer, temperature, max_new_tokens, decode)
  rollout = generate(model, prompts, cfg, G, seed)
  completions = completion_lists(rollout)
  texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
  answers = [p.answer for p in problems for _ in range(G)]
  correct_B = np.array([is_correct(t, a) for t, a in zip(texts, answers, strict=True)], bool)
  lengths_B = np.asarray(rollout.lengths_B)
  trunc_B = np.asarray(rollout.truncated_B, bool)
  # " let me " opens each re-check (and the optional preamble, which adds one)
  checks_B = np.array([t.count(" let me ") for t in texts])
  arrays = token_arrays(model, rollout, temperature)
  stats = token_statistics(arrays["p_BCV"], arrays["tokens_BC"])
  mask = arrays["mask_BC"]
  ent_B = np.where(mask, stats["entropy_BC"], 0).sum(1) / np.maximum(mask.sum(1), 1)
  conn = connector_ids(tokenizer)
  P = len(problems)
  adv_B = {
    name: entropy_grad.advantages_PG(
      adv_name, correct_B.reshape(P, G), lengths_B.reshape(P, G), trunc_B.reshape(P, G),
      max_new_tokens, r,
    ).reshape(-1)
    for name, adv_name in OBJECTIVES
  }  # fmt: skip
  reward_B = adv_B["compression"]  # A = R: the compression objective's own weights
  out = {
    "num_problems": P, "group_size": G, "temperature": temperature,
    "max_new_tokens": max_new_tokens, "r": r, "accuracy": float(correct_B.mean()),
    "mean_tokens": float(lengths_B.mean()), "truncated": float(trunc_B.mean()),
    **within_group(lengths_B.reshape(P, G), correct_B.reshape(P, G)),
    "objectives": {},
  }  # fmt: skip
  ent1_BC = np.asarray(rollout.entropy_BC)  # the sampler's T = 1 entropy
  for name, _ in OBJECTIVES:
    adv = adv_B[name]
    grad_BC = np.abs(adv)[:, None] * stats["dist_BC"]
    corr = entropy_grad.token_table(stats["entropy_BC"], ent1_BC, grad_BC, adv, mask)
    weight_B = reward_B if name == "compression" else correct_B.astype(float)
    out["objectives"][name] = {
      "pearson_r": corr["pearson_r"],
      "pearson_r_active": corr["pearson_r_active"],
      "pearson_r_entropy_t1": corr["pearson_r_entropy_t1"],
      "active_tokens": corr["num_active_tokens"],
      **connector_gradient(adv, arrays["p_BCV"], arrays["tokens_BC"], mask, conn),
      **selected(weight_B, lengths_B, ent_B, checks_B),
    }
    if out_dir is not None:
      d = pathlib.Path(out_dir)
      d.mkdir(parents=True, exist_ok=True)
      title = f"{name} objective, T={temperature}"
      entropy_grad.plot(stats["entropy_BC"][mask], grad_BC[mask], corr["pearson_r"],
                        d / f"entropy_grad_{name}.png", title)  # fmt: skip
  if out_dir is not None:
    _plot_selected(pathlib.Path(out_dir) / "selected_samples.png", out, lengths_B, ent_B,
                   correct_B, reward_B)  # fmt: skip
  return out


def _plot_selected(path, summary, lengths_B, ent_B, correct_B, reward_B) -> None:
  from egrc_jax.analysis import common

  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, vals, label in ((axes[0], lengths_B, "response length (tokens)"),
                          (axes[1], ent_B, "mean token entropy")):  # fmt: skip
    bins = np.linspace(vals.min(), vals.max() + 1e-9, 30)
    ax.hist(vals, bins=bins, alpha=0.3, color="gray", label="all samples", density=True)
    if correct_B.any():
      ax.hist(vals[correct_B], bins=bins, alpha=0.55, color="tab:blue", density=True,
              label="accuracy objective (c = 1)")  # fmt: skip
    if reward_B.sum() > 0:
      sel = reward_B > 0
      ax.hist(vals[sel], bins=bins, weights=reward_B[sel], alpha=0.55, color="tab:orange",
              density=True, label="compression objective (R-weighted)")  # fmt: skip
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
  fig.suptitle(
    f"samples each objective prefers (within-group r(length, correct) = "
    f"{summary['length_correct_r']:.3f})"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_for_seed(plan, seed_dir, seed: int, model, out_dir) -> dict:
  """The diagnostics of `model` on the first pipeline.conflict_prompts test problems of a
  seed's data, at the stage-1 rollout settings; writes conflict.json and the plots."""
  from egrc_jax.toy.pipeline import load_problems

  c = plan.config
  seed_dir = pathlib.Path(seed_dir)
  tokenizer = load_tokenizer(seed_dir / "tokenizer")
  problems = load_problems(seed_dir / "data" / "test.jsonl", plan.pipeline.conflict_prompts)
  summary = diagnose(
    model, tokenizer, problems, num_samples=c.rollout.num_samples,
    temperature=c.compress.temperature, max_new_tokens=c.rollout.max_new_tokens,
    r=c.compress.r, seed=seed, decode=plan.decode, out_dir=out_dir,
  )  # fmt: skip
  pathlib.Path(out_dir, "conflict.json").write_text(json.dumps(summary, indent=1) + "\n")
  return summary


def main(argv=None) -> dict:
  from egrc_jax.toy.checkpoint import load_sft
  from egrc_jax.toy.plan import plan_of, toy_parser

  parser = toy_parser("python -m egrc_jax.toy.conflict", __doc__)
  parser.add_argument("--workdir", required=True, help="a seed directory of the pipeline")
  parser.add_argument("--model", default="sft", help="sft, or an arm's name (its hf_final/)")
  parser.add_argument("--prompts", type=int, default=100, help="test problems (P)")
  parser.add_argument("--out", default="", help="default: <workdir>/conflict_<model>")
  args = parser.parse_args(argv)
  if args.prompts < 1:
    parser.error(f"--prompts={args.prompts} must be >= 1")
  plan = plan_of(args)
  plan = dataclasses.replace(
    plan, pipeline=dataclasses.replace(plan.pipeline, conflict_prompts=args.prompts)
  )
  seed_dir = pathlib.Path(args.workdir)
  path = seed_dir / ("sft" if args.model == "sft" else f"{args.model}/hf_final")
  if not (path / "config.json").is_file():
    raise cli.UserError(f"no model at {path}: run the pipeline for this seed first")
  # The pipeline's seed directories are named seed<S>; S seeds the sampler as in the pipeline.
  seed = int(seed_dir.name[4:]) if seed_dir.name[4:].isdigit() else 0
  out = args.out or str(seed_dir / f"conflict_{args.model}")
  summary = run_for_seed(plan, seed_dir, seed, load_sft(path)[0], out)
  print(json.dumps(summary, indent=1))
  return summary


if __name__ == "__main__":
  sys.exit(cli.run(main))
