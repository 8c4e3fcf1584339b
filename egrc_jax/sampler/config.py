"""Static sampler settings: a frozen, hashable dataclass (a static jit argument)."""

from __future__ import annotations

import dataclasses

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
LOOPS = ("lockstep", "continuous")
KV_LAYOUTS = ("auto", "dense", "split", "paged")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample a rollout.

  The sampling distribution of a step is softmax(filter(logits / temperature)), where the
  filter keeps the top_k largest logits (0 = all) and then the smallest set of the most
  probable tokens whose mass reaches top_p (1.0 = all). greedy=True takes the argmax of the
  raw logits instead and ignores temperature/top_p/top_k.
  """

  temperature: float = 1.0  # T > 0; divides the logits (ignored when greedy).
  top_p: float = 1.0  # nucleus mass in (0, 1]; 1.0 switches the filter off.
  top_k: int = 0  # keep the k largest logits; 0 switches the filter off.
  greedy: bool = False  # argmax decoding (deterministic; sampling logprob is then 0).
  max_new_tokens: int = 256  # C: the completion budget per row.
  stop_token_ids: tuple[int, ...] = ()  # a row stops after emitting any of these.
  pad_id: int = 0  # fills prompt left padding and completion slots after the stop.
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS  # prompts are left-padded to one of these.
  # lockstep: all P*G rows decode together until the longest stops (generate.py);
  # continuous: num_slots rows at a time, a slot refilled on device when its row stops
  # (continuous.py).
  loop: str = "lockstep"
  num_slots: int = 64  # continuous: B_s rows decoded at once (at most P*G are used).
  # continuous: once nothing is pending, live rows move into B_s/2, B_s/4, ... slots, at
  # most this many times (0 = never); each level compiles one more loop body.
  shrink_levels: int = 3
  # continuous: "dense" slots of Tp + C (the lock-step arithmetic; CPU), "split" slots of C
  # + the shared prompt cache, "paged" page pool read by the TPU paged-attention kernel,
  # "auto": paged on TPU, dense elsewhere (docs/sampler.md).
  kv_layout: str = "auto"
  page_size: int = 16  # paged: tokens per KV page (Pg).

  def __post_init__(self):
    if not isinstance(self.stop_token_ids, tuple):
      # A list would make the config unhashable (it is a static jit argument).
      object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    if not isinstance(self.prompt_buckets, tuple):
      object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
    if not self.greedy and not self.temperature > 0:
      raise ValueError(
        f"temperature={self.temperature} must be > 0 when sampling; use greedy=True for argmax"
      )
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]; use 1.0 to switch it off")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 switches it off)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if any(t < 0 for t in self.stop_token_ids):
      raise ValueError(f"stop_token_ids={self.stop_token_ids} must be non-negative token ids")
    if self.pad_id < 0:
      raise ValueError(f"pad_id={self.pad_id} must be a non-negative token id")
    if not self.prompt_buckets or any(b < 1 for b in self.prompt_buckets):
      raise ValueError(f"prompt_buckets={self.prompt_buckets} must be positive lengths")
    if self.loop not in LOOPS:
      raise ValueError(f"loop={self.loop!r} is not a decode loop; use one of {LOOPS}")
    if self.num_slots < 1:
      raise ValueError(f"num_slots={self.num_slots} must be >= 1 (rows decoded at once)")
    if self.shrink_levels < 0:
      raise ValueError(f"shrink_levels={self.shrink_levels} must be >= 0 (0 = never shrink)")
    if self.kv_layout not in KV_LAYOUTS:
      raise ValueError(f"kv_layout={self.kv_layout!r} is not a KV layout; use one of {KV_LAYOUTS}")
    if self.page_size < 1:
      raise ValueError(f"page_size={self.page_size} must be >= 1 (tokens per KV page)")
    if list(self.prompt_buckets) != sorted(set(self.prompt_buckets)):
      raise ValueError(
        f"prompt_buckets={self.prompt_buckets} must be strictly increasing, e.g. (64, 128, 256)"
      )

  def replace(self, **kw) -> SamplingConfig:
    return dataclasses.replace(self, **kw)

  def bucket(self, length: int) -> int:
    """The smallest bucket that holds a prompt of `length` tokens."""
    for b in self.prompt_buckets:
      if length <= b:
        return b
    raise ValueError(
      f"a prompt of {length} tokens is longer than the largest prompt bucket "
      f"{self.prompt_buckets[-1]}; add a larger bucket to prompt_buckets or shorten the prompt"
    )
