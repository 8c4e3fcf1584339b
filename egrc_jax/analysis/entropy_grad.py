"""Entropy-gradient correlation [paper, Fig. 3d].

Shape letters: P prompts, G samples per prompt, B = P * G rows, C completion budget.

For each sampled response token t (on-policy, so the PPO ratio is 1 and nothing is clipped):
  H_t = -sum_v p_v log p_v,   p = softmax(logits / T) at the sampling temperature T
  g_t = |A_t| * ||e_{a_t} - p_t||_2 = |A_t| sqrt(1 - 2 p_{a_t} + sum_v p_v^2)
        (`losses.logit_grad_norm`: the norm of the loss gradient w.r.t. the tempered logits)
with the response's advantage A from its group's rewards:
  grpo:          A = (c - mean_G c) / (std_G c + 1e-6)            (accuracy reward)
  egrc_compress: A = beta * R, R = c * f(|y|), 0 when truncated   (EGRC stage 1, beta = 1)
Pearson r(H, g) over all valid response tokens, and over the tokens with A != 0 (the tokens
that get any gradient). Also r with the untempered (T = 1) entropy the sampler returns.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from egrc_jax import losses
from egrc_jax.analysis import common, sampling
from egrc_jax.rewards import RewardConfig, compute_rewards

ADVANTAGES = ("grpo", "egrc_compress")


def advantages_PG(mode: str, correct_PG, lengths_PG, truncated_PG, max_len: int, r: float = 0.5):
  """Per-response advantages [P, G] for `mode` in ADVANTAGES (see the module docstring)."""
  if mode == "grpo":
    acc = compute_rewards(RewardConfig("accuracy", max_len=max_len), correct_PG, lengths_PG,
                          truncated_PG).total_PG  # fmt: skip
    return np.asarray(losses.group_relative_advantages(jnp.asarray(acc)))
  if mode == "egrc_compress":
    rew = compute_rewards(RewardConfig("egrc_compress", max_len=max_len, r=r), correct_PG,
                          lengths_PG, truncated_PG)  # fmt: skip
    return np.asarray(losses.absolute_advantages(jnp.asarray(rew.total_PG))[0])
  raise ValueError(f"advantage={mode!r}; use one of {ADVANTAGES}")


def correlation(entropy_BT, grad_BT, mask_BT) -> float:
  """Pearson r of entropy and gradient norm over mask (`losses.pearson_corr`)."""
  return float(losses.pearson_corr(jnp.asarray(entropy_BT), jnp.asarray(grad_BT),
                                   jnp.asarray(mask_BT)))  # fmt: skip


def token_table(entropy_BC, entropy_t1_BC, grad_BC, adv_B, mask_BC) -> dict:
  """Per-token arrays of the valid tokens plus the correlations (numbers of Fig. 3d)."""
  mask = np.asarray(mask_BC, bool)
  active = mask & (np.abs(np.asarray(adv_B))[:, None] > 0)
  return {
    "pearson_r": correlation(entropy_BC, grad_BC, mask),
    "pearson_r_active": correlation(entropy_BC, grad_BC, active),
    "pearson_r_entropy_t1": correlation(entropy_t1_BC, grad_BC, mask),
    "num_tokens": int(mask.sum()),
    "num_active_tokens": int(active.sum()),
  }


def plot(entropy, grad, r: float, path, title: str) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 5))
  if len(entropy) >= 50:
    hb = ax.hexbin(entropy, grad, gridsize=40, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, label="tokens (log)")
  else:
    ax.scatter(entropy, grad, s=8, alpha=0.6)
  ax.set_xlabel("token entropy H_t")
  ax.set_ylabel("|A_t| * ||e_a - p||  (logit-gradient norm)")
  ax.set_title(f"{title}\nPearson r = {r:.3f}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(model: str, prompts: str, out: str, settings: sampling.SampleSettings, data_root: str,
        advantage: str = "grpo", r: float = 0.5, tokenizer: str = "") -> dict:  # fmt: skip
  """Sample, grade, recompute token stats; write entropy_grad.{png,csv,json} to `out`."""
  if advantage not in ADVANTAGES:
    raise ValueError(f"advantage={advantage!r}; use one of {ADVANTAGES}")
  m, _, examples, rollout, _, correct_B = sampling.sample_and_grade(
    model, prompts, settings, data_root, tokenizer
  )
  d = common.out_dir(out)
  G = settings.n
  lengths_B = sampling.host(rollout.lengths_B)
  trunc_B = sampling.host(rollout.truncated_B)
  adv_PG = advantages_PG(advantage, correct_B.reshape(-1, G), lengths_B.reshape(-1, G),
                         trunc_B.reshape(-1, G), settings.max_new_tokens, r)  # fmt: skip
  adv_B = adv_PG.reshape(-1)
  stats = sampling.teacher_forced_stats(m, rollout, settings.temperature)
  mask_BC = sampling.host(rollout.completion_mask_BC)
  adv_BC = np.broadcast_to(adv_B[:, None], mask_BC.shape)
  grad_BC = sampling.host(
    losses.logit_grad_norm(jnp.asarray(adv_BC), stats.logp_BC, stats.sum_p2_BC,
                           jnp.zeros(mask_BC.shape, bool))
  )  # fmt: skip
  ent_BC = sampling.host(stats.entropy_BC)
  ent1_BC = sampling.host(rollout.entropy_BC)
  summary = token_table(ent_BC, ent1_BC, grad_BC, adv_B, mask_BC)
  summary.update(
    advantage=advantage,
    temperature=settings.temperature,
    prompts=prompts,
    num_prompts=len(examples),
    group_size=G,
    accuracy=float(correct_B.mean()),
  )
  rows = [
    {"row": int(b), "t": int(t), "entropy": float(ent_BC[b, t]), "entropy_t1": float(ent1_BC[b, t]),
     "grad_norm": float(grad_BC[b, t]), "advantage": float(adv_B[b])}
    for b, t in zip(*np.nonzero(mask_BC), strict=True)
  ]  # fmt: skip
  common.write_csv(d / "entropy_grad.csv", rows)
  common.write_json(d / "entropy_grad.json", summary)
  valid = mask_BC.astype(bool)
  plot(ent_BC[valid], grad_BC[valid], summary["pearson_r"], d / "entropy_grad.png",
       f"{advantage} advantages, T={settings.temperature}")  # fmt: skip
  return summary
