"""From a rollout and its rewards to the learner's `Batch` (host side, numpy).

Shape letters: P prompts, G samples, B = P G rows, Tp prompt length, C completion length.
"""

from __future__ import annotations

import numpy as np

from egrc_jax import losses
from egrc_jax.model import positions_from_mask
from egrc_jax.rewards import Rewards
from egrc_jax.sampler.rollout import Rollout
from egrc_jax.train import Batch
from egrc_jax.trainer.plan import AdvantageConfig


def advantages(cfg: AdvantageConfig, rewards: Rewards) -> tuple[np.ndarray, np.ndarray]:
  """(advantage [P, G], sample mask [P, G]) by the stage's rule (EGRC.md)."""
  if cfg.kind == "absolute":
    adv, keep = losses.absolute_advantages(rewards.total_PG, cfg.beta)
  elif cfg.kind == "decomposed":
    adv = losses.decomposed_advantages(rewards.acc_PG, rewards.len_PG, cfg.w_len, cfg.std_normalize)
    keep = np.ones_like(rewards.total_PG, bool)
  else:
    adv = losses.group_relative_advantages(rewards.total_PG, cfg.std_normalize)
    keep = np.ones_like(rewards.total_PG, bool)
  return np.asarray(adv, np.float32), np.asarray(keep, bool)


def make_batch(
  rollout: Rollout, adv_PG: np.ndarray, keep_PG: np.ndarray, loss_cfg: losses.LossConfig
) -> Batch:
  """The learner's batch. Old logprobs are the sampler's log q (the sampling distribution:
  stage temperature and filters), the behaviour policy of the PPO ratio; with a filter on,
  the RL step replaces them by the learner's own recomputation (the StagePlan's
  recompute_old_logprobs), since the learner's log p_T cannot reproduce log q."""
  prompt = np.asarray(rollout.prompt_tokens_BTp)
  pmask = np.asarray(rollout.prompt_mask_BTp)
  comp = np.asarray(rollout.completion_tokens_BC)
  cmask = np.asarray(rollout.completion_mask_BC)
  tokens = np.concatenate([prompt, comp], 1)
  mask = np.concatenate([pmask, cmask], 1)
  # Weights and entropy selection for the whole batch (the behaviour policy's entropy).
  weight, select = losses.loss_weights(
    cmask, keep_PG.reshape(-1), np.asarray(rollout.entropy_BC), loss_cfg
  )
  adv_BC = np.broadcast_to(adv_PG.reshape(-1, 1), comp.shape).astype(np.float32)
  return Batch(
    tokens_BS=tokens.astype(np.int32),
    mask_BS=mask,
    positions_BS=np.asarray(positions_from_mask(mask)),
    targets_BC=comp.astype(np.int32),
    old_logp_BC=np.asarray(rollout.logprobs_BC, np.float32),
    sampler_logp_BC=np.asarray(rollout.tempered_logprobs_BC, np.float32),
    ref_logp_BC=np.zeros(comp.shape, np.float32),
    adv_BC=np.ascontiguousarray(adv_BC),
    weight_BC=np.asarray(weight, np.float32),
    select_BC=np.asarray(select, np.float32),
  )
