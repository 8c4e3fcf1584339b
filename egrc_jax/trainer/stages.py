"""Arms as sequences of stages, and the entropy-triggered stage switch.

A stage fixes what one RL step does: sampling temperature, the reward, and how rewards
become advantages. An arm (config.arm) is one or two stages run back to back, the second
starting from the first's final params.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import ml_collections


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str  # compress | enhance | ee | grpo | baseline
  steps: int  # planned steps (the entropy switch may end stage 1 earlier)
  temperature: float  # sampling temperature of the rollouts
  reward: str  # egrc_jax.rewards.RewardConfig name
  advantage: str  # absolute (stage 1: A = beta R, positive-only) | group | decomposed
  reward_kwargs: tuple[tuple[str, float | int | bool | str], ...] = ()  # extra RewardConfig fields
  beta: float = 1.0
  w_len: float = 0.0
  std_normalize: bool = True
  excluded_in_denominator: bool = False
  kl_coef: float | None = None  # this stage's KL weight; None: loss.kl_coef

  def kwargs(self) -> dict:
    return dict(self.reward_kwargs)


def _kl_coef(section) -> float | None:
  """A section's own KL weight, or None (< 0) for the global loss.kl_coef."""
  return None if section.kl_coef < 0 else float(section.kl_coef)


def _compress(c) -> Stage:
  reward = "egrc_compress" if c.compress.shaping == "exp" else "linear_compress"
  return Stage(
    name="compress",
    steps=c.compress.steps,
    temperature=c.compress.temperature,
    reward=reward,
    advantage=c.compress.advantage,
    reward_kwargs=(
      ("r", c.compress.r),
      ("shaping", c.compress.shaping),
      ("clip_truncated", c.compress.clip_truncated),
    ),
    beta=c.compress.beta,
    excluded_in_denominator=c.compress.excluded_in_denominator,
    kl_coef=_kl_coef(c.compress),
  )


def _enhance(c) -> Stage:
  return Stage(
    name="enhance",
    steps=c.enhance.steps,
    temperature=c.enhance.temperature,
    reward="egrc_enhance",
    advantage="decomposed" if c.enhance.decompose else "group",
    reward_kwargs=(
      ("r", c.enhance.r),
      ("w_len", c.enhance.w_len),
      ("clip_truncated", c.enhance.clip_truncated),
    ),
    w_len=c.enhance.w_len,
    std_normalize=c.enhance.std_normalize,
    kl_coef=_kl_coef(c.enhance),
  )


def _single(c, name: str, reward: str, **kw) -> Stage:
  return Stage(
    name=name,
    steps=c.single.steps,
    temperature=c.single.temperature,
    reward=reward,
    advantage="group",
    reward_kwargs=tuple(sorted(kw.items())),
    std_normalize=c.enhance.std_normalize,
    kl_coef=_kl_coef(c.single),
  )


def stage_loss_config(loss_cfg, stage: Stage):
  """The loss of one stage: `loss_cfg` with the stage's own KL weight where it has one. A
  stage whose KL weight is 0 has no KL term, and so needs no reference logprobs."""
  coef = loss_cfg.kl_coef if stage.kl_coef is None else stage.kl_coef
  if coef > 0:
    return dataclasses.replace(loss_cfg, kl_coef=coef)
  return dataclasses.replace(loss_cfg, kl_kind=None, kl_coef=0.0)


def stages_for(c: ml_collections.ConfigDict) -> list[Stage]:
  """The stage list of config.arm (validated by config.validate)."""
  s = c.single
  table = {
    "egrc": lambda: [_compress(c), _enhance(c)],
    "reverse": lambda: [_enhance(c), _compress(c)],
    "compress": lambda: [_compress(c)],
    "enhance": lambda: [_enhance(c)],
    "ee": lambda: [_single(c, "ee", "ee", r=s.r, w_len=s.w_len, clip_truncated=s.clip_truncated)],
    "grpo": lambda: [_single(c, "grpo", "accuracy", clip_truncated=s.clip_truncated)],
    "baseline": lambda: [
      _single(
        c,
        "baseline",
        s.reward,
        r=s.r,
        l1_alpha=s.l1_alpha,
        az_alpha=s.az_alpha,
        n_target=s.n_target,
        buffer=s.buffer,
        clip_truncated=s.clip_truncated,
        kimi_weight=s.kimi_weight,
        sb_correct_weight=s.sb_correct_weight,
        sb_beta=s.sb_beta,
        dapo_scale=s.dapo_scale,
        dapo_signed=s.dapo_signed,
      )
    ],
  }
  if c.arm not in table:
    raise ValueError(f"arm={c.arm!r} does not exist; choose one of {sorted(table)}")
  return table[c.arm]()


class EntropySwitch:
  """Ends stage 1 when the smoothed policy entropy stops descending.

  Smoothed entropy e_k = mean of the last `window` step entropies. With e_now and the value
  one window earlier e_prev, switch when (e_prev - e_now) / e_prev < min_drop, after at least
  `min_steps` steps. Its state is a plain list so checkpoints can carry it.
  """

  def __init__(self, window: int, min_drop: float, min_steps: int, history=()):
    if window < 1:
      raise ValueError(f"switch.window={window}: need >= 1")
    self.window, self.min_drop, self.min_steps = window, min_drop, min_steps
    self.history: deque[float] = deque(history, maxlen=2 * window)
    self.steps = len(history)

  def update(self, entropy: float) -> bool:
    """Record one step's mean token entropy; True when stage 1 should end now."""
    self.history.append(float(entropy))
    self.steps += 1
    if self.steps < max(self.min_steps, 2 * self.window):
      return False
    h = list(self.history)
    prev = sum(h[: self.window]) / self.window
    now = sum(h[self.window :]) / self.window
    drop = (prev - now) / max(abs(prev), 1e-12)
    return drop < self.min_drop

  def state(self) -> dict:
    return {"history": list(self.history), "steps": self.steps}

  @classmethod
  def from_state(cls, window, min_drop, min_steps, state: dict | None) -> EntropySwitch:
    sw = cls(window, min_drop, min_steps, (state or {}).get("history", ()))
    sw.steps = (state or {}).get("steps", 0)
    return sw
