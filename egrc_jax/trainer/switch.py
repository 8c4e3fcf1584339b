"""The entropy-triggered stage switch: stage 1 ends when the smoothed policy entropy stops
descending (EGRC.md, [ours]); its settings are the StagePlan's SwitchConfig."""

from __future__ import annotations

from collections import deque

from egrc_jax.trainer.plan import SwitchConfig


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
  def from_state(cls, cfg: SwitchConfig, state: dict | None) -> EntropySwitch:
    sw = cls(cfg.window, cfg.min_drop, cfg.min_steps, (state or {}).get("history", ()))
    sw.steps = (state or {}).get("steps", 0)
    return sw
