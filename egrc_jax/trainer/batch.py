"""From a rollout and its rewards to the learner's `Batch` (host side, numpy), padded or
packed.

Shape letters: P prompts, G samples, B = P G rollout rows, Tp prompt length (the bucket),
C completion budget, S = Tp + C slots of a learner row, R packed rows.

Both layouts carry the same per-token loss inputs (weights, selection factors, advantages,
old logprobs), computed on the rollout's [B, C] grid once and placed at each token's slot,
so a packed batch's loss is the padded batch's, up to float summation order:
  padded  one rollout row per learner row: the prompt left padded to Tp, then the
          completion; the loss positions are slots Tp-1 .. S-2 (C per row);
  packed  each rollout row's real tokens (prompt, then completion) end to end in rows of S
          slots (first fit, longest first), segment ids 1, 2, ... and positions restarting
          per sequence; every slot is a loss position (C = S), the ones that predict a
          completion token carry the inputs. With micro-batches (`micro_batch_rows`),
          R = B: the filled rows are placed so that they make up the first micro-batches
          (the train step's strided split, micro-batch j = rows j, j + m, ...), the empty
          rows form whole micro-batches, which the step skips, so a batch costs
          ceil(filled / micro_batch_rows) micro-batches and a run compiles one learner step.
          Without, R is rounded up to `rows_multiple` times 1, 2, 3, 4, 6, 8, 12, ... (capped
          at B): a run compiles one learner step per bucket of R.
"""

from __future__ import annotations

import numpy as np

from egrc_jax import losses
from egrc_jax.model import positions_from_mask
from egrc_jax.rewards import Rewards
from egrc_jax.sampler.rollout import Rollout
from egrc_jax.train import Batch
from egrc_jax.trainer.plan import AdvantageConfig

LAYOUTS = ("packed", "padded")


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
  rollout: Rollout,
  adv_PG: np.ndarray,
  keep_PG: np.ndarray,
  loss_cfg: losses.LossConfig,
  layout: str = "padded",
  rows_multiple: int = 1,
  micro_batch_rows: int = 0,
) -> Batch:
  """The learner's batch of a rollout (module docstring). Old logprobs are the sampler's
  log q (the sampling distribution: stage temperature and filters), the behaviour policy of
  the PPO ratio; with a filter on, the RL step replaces them by the learner's own
  recomputation (the StagePlan's recompute_old_logprobs)."""
  if layout not in LAYOUTS:
    raise ValueError(f"learner layout {layout!r}: use one of {LAYOUTS}")
  comp = np.asarray(rollout.completion_tokens_BC)
  cmask = np.asarray(rollout.completion_mask_BC)
  # Weights and entropy selection for the whole batch (the behaviour policy's entropy).
  weight, select = losses.loss_weights(
    cmask, keep_PG.reshape(-1), np.asarray(rollout.entropy_BC), loss_cfg
  )
  per_token = {
    "old_logp_BC": np.asarray(rollout.logprobs_BC, np.float32),
    "sampler_logp_BC": np.asarray(rollout.tempered_logprobs_BC, np.float32),
    "ref_logp_BC": np.zeros(comp.shape, np.float32),
    "adv_BC": np.broadcast_to(adv_PG.reshape(-1, 1), comp.shape).astype(np.float32),
    "weight_BC": np.asarray(weight, np.float32),
    "select_BC": np.asarray(select, np.float32),
  }
  if layout == "padded":
    return _padded(rollout, per_token)
  return _packed(rollout, per_token, rows_multiple, micro_batch_rows)


def _padded(rollout: Rollout, per_token: dict) -> Batch:
  prompt = np.asarray(rollout.prompt_tokens_BTp)
  pmask = np.asarray(rollout.prompt_mask_BTp)
  comp = np.asarray(rollout.completion_tokens_BC)
  cmask = np.asarray(rollout.completion_mask_BC)
  tokens = np.concatenate([prompt, comp], 1).astype(np.int32)
  mask = np.concatenate([pmask, cmask], 1)
  return Batch(
    tokens_BS=tokens,
    segments_BS=mask.astype(np.int32),
    positions_BS=np.asarray(positions_from_mask(mask)),
    targets_BC=comp.astype(np.int32),
    completion_BC=cmask.astype(bool),
    **{k: np.ascontiguousarray(v) for k, v in per_token.items()},
    head_start=prompt.shape[1] - 1,
  )


def pack_rows(lengths_B: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray, int]:
  """First-fit decreasing: (row [B], offset [B], rows used) placing sequences of the given
  lengths (each <= S) end to end in rows of S slots; ties keep the rollout order."""
  order = sorted(range(len(lengths_B)), key=lambda b: (-int(lengths_B[b]), b))
  free: list[int] = []  # slots left per row
  row_B = np.zeros(len(lengths_B), np.int64)
  off_B = np.zeros(len(lengths_B), np.int64)
  for b in order:
    n = int(lengths_B[b])
    if n > S:
      raise ValueError(f"a sequence of {n} tokens does not fit a learner row of {S} slots")
    r = next((i for i, f in enumerate(free) if f >= n), len(free))
    if r == len(free):
      free.append(S)
    row_B[b], off_B[b] = r, S - free[r]
    free[r] -= n
  return row_B, off_B, len(free)


def _next_bucket(b: int) -> int:
  """1 -> 2 -> 3 -> 4 -> 6 -> 8 -> 12 -> ...: 2^k, then 3 * 2^(k-1) between two powers."""
  if b < 2:
    return 2
  return b + b // 2 if b & (b - 1) == 0 else b // 3 * 4


def bucket_rows(needed: int, multiple: int, cap: int) -> int:
  """The smallest multiple * b >= needed with b in 1, 2, 3, 4, 6, 8, 12, 16, ... (half-octave
  steps, so at most a third of the rows are empty), at most `cap` (the padded row count)."""
  m, b = max(multiple, 1), 1
  while m * b < needed:
    b = _next_bucket(b)
  return min(m * b, cap)


def micro_batch_major(R: int, micro_batch_rows: int) -> np.ndarray:
  """[R] the learner row of packed row r (in fill order) such that micro-batch j of the
  train step's strided split (rows j, j + m, j + 2m, ... with m = R / micro_batch_rows)
  holds packed rows j b .. j b + b - 1 (b = micro_batch_rows; 0 or R: the identity)."""
  b = micro_batch_rows or R
  if R % b:
    raise ValueError(f"{R} learner rows do not split into micro-batches of {b} rows")
  r = np.arange(R)
  return (r % b) * (R // b) + r // b


def _packed(rollout: Rollout, per_token: dict, rows_multiple: int, micro_batch_rows: int) -> Batch:
  prompt = np.asarray(rollout.prompt_tokens_BTp)
  pmask = np.asarray(rollout.prompt_mask_BTp)
  comp = np.asarray(rollout.completion_tokens_BC)
  B, Tp = prompt.shape
  C = comp.shape[1]
  S = Tp + C
  plen_B = pmask.sum(1)
  clen_B = np.asarray(rollout.lengths_B)
  n_B = plen_B + clen_B
  row_B, off_B, needed = pack_rows(n_B, S)
  # With micro-batches, every packed batch has the rollout's B rows: its empty rows form
  # whole micro-batches, which the step skips, so one shape costs what a bucket would and a
  # run compiles one learner step and one logprob pass (a bucket's compile took 5 s on the
  # toy, 7 per run; a minute on a TPU for R1-Distill). Without micro-batches, buckets.
  R = B if micro_batch_rows else bucket_rows(needed, rows_multiple, B)
  row_B = micro_batch_major(R, micro_batch_rows)[row_B]
  tokens = np.zeros((R, S), np.int32)
  segments = np.zeros((R, S), np.int32)
  positions = np.zeros((R, S), np.int32)
  targets = np.zeros((R, S), np.int32)
  completion = np.zeros((R, S), bool)
  out = {k: np.zeros((R, S), np.float32) for k in per_token}
  seg_count = np.zeros(R, np.int32)
  for b in range(B):
    r, o, p, c = row_B[b], off_B[b], plen_B[b], clen_B[b]
    seq = np.concatenate([prompt[b][pmask[b]], comp[b, :c]])
    seg_count[r] += 1
    tokens[r, o : o + p + c] = seq
    segments[r, o : o + p + c] = seg_count[r]
    positions[r, o : o + p + c] = np.arange(p + c)
    # Slot o + p - 1 + t (the prompt's last token, then completion token t - 1) predicts
    # completion token t, as slot Tp - 1 + t does in the padded row.
    slots = o + p - 1 + np.arange(c)
    targets[r, slots] = comp[b, :c]
    completion[r, slots] = True
    for k, v in per_token.items():
      out[k][r, slots] = v[b, :c]
  return Batch(
    tokens_BS=tokens,
    segments_BS=segments,
    positions_BS=positions,
    targets_BC=targets,
    completion_BC=completion,
    **out,
    head_start=0,
  )
