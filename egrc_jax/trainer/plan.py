"""The run configuration compiled into typed plans: `build_plan(config) -> RunPlan`.

The ConfigDict (trainer/config.py, configs/*.py) is what users write; the plan is what the
code reads. Every field of every dataclass below comes from one config key (named in its
comment), and `build_plan` is the only place that reads the ConfigDict for them: there are
no other copies of a setting and no sentinel left to decode downstream. `finalize` builds
the plan once, so a bad combination fails inside `get_config`, naming the config key.

  RunPlan
    stages: StagePlan(name, steps, sampling, reward, advantage, loss, switch,
                      recompute_old_logprobs) per stage of `arm`
    data:   DataPlan(train, eval: DataConfig, num_samples)
    eval:   EvalPlan(every, num_prompts, num_samples, sampling, batch_prompts)
    optim:  OptimPlan(adamw, ppo_epochs, micro_batch_rows, layout, remat, max_bad_steps)

A StagePlan's SamplingConfig has no stop tokens or pad id yet: those come from the run's
tokenizer (`bind_tokens`). The loss reads its temperature from the same `stage.sampling`
the sampler used.
"""

from __future__ import annotations

import contextlib
import dataclasses

import ml_collections

from egrc_jax.data.pipeline import DataConfig
from egrc_jax.losses import LossConfig
from egrc_jax.rewards import RewardConfig
from egrc_jax.sampler import SamplingConfig
from egrc_jax.train import OptimConfig

ARMS = (
  "egrc",  # compress, then enhance from the compressed params [paper]
  "compress",  # stage 1 only
  "enhance",  # stage 2 only
  "ee",  # entropy-entangled: one stage, R = c + w*c*f(|y|), GRPO advantages [paper Fig. 3]
  "reverse",  # enhance, then compress [paper: ablation]
  "grpo",  # accuracy only, GRPO advantages
  "baseline",  # one GRPO stage on a literature reward (`single.reward`)
)
ADVANTAGE_KINDS = ("absolute", "group", "decomposed")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """How a stage turns rewards into advantages (EGRC.md; losses/advantages.py)."""

  kind: str  # absolute (stage 1: A = beta R, positive-only) | group (GRPO) | decomposed
  beta: float = 1.0  # compress.beta: A = beta R
  w_len: float = 0.0  # enhance.w_len: A = norm_G(R_acc) + w_len norm_G(R_len)
  std_normalize: bool = True  # enhance.std_normalize: divide by the group std (GRPO)

  def __post_init__(self):
    if self.kind not in ADVANTAGE_KINDS:
      raise ValueError(f"advantage kind {self.kind!r}: use one of {ADVANTAGE_KINDS}")


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
  """Entropy-triggered end of stage 1 (switch.*; `stages.EntropySwitch`)."""

  window: int  # switch.window
  min_drop: float  # switch.min_drop
  min_steps: int  # switch.min_steps

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(f"switch.window={self.window}: need >= 1")


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Everything one RL step of a stage does."""

  name: str  # compress | enhance | ee | grpo | baseline
  steps: int  # <section>.steps (the entropy switch may end stage 1 earlier)
  sampling: SamplingConfig  # <section>.temperature, rollout.{top_p, top_k, max_new_tokens, ...}
  reward: RewardConfig  # the stage's reward and its constants
  advantage: AdvantageConfig
  loss: LossConfig  # loss.*, with the stage's own KL weight (<section>.kl_coef)
  switch: SwitchConfig | None  # entropy-triggered end (switch.mode=entropy, stage 1 of two)
  recompute_old_logprobs: bool  # rollout.recompute_old_logprobs, resolved for the filters

  @property
  def temperature(self) -> float:
    return self.sampling.temperature


@dataclasses.dataclass(frozen=True)
class DataPlan:
  train: DataConfig  # data.train_* and the shared data.* keys
  eval: DataConfig | None  # data.eval_*; None without evaluation (eval.num_prompts = 0)
  num_samples: int  # rollout.num_samples: G responses per prompt

  @property
  def prompts_per_step(self) -> int:
    return self.train.batch_size

  @property
  def rows(self) -> int:
    return self.prompts_per_step * self.num_samples


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  every: int  # eval.every: steps between evaluations; 0 = only at the end of each stage
  num_prompts: int  # eval.num_prompts (0 = no evaluation)
  num_samples: int  # eval.num_samples
  sampling: SamplingConfig  # eval.{temperature, top_p, max_new_tokens}, rollout.prompt_buckets
  # eval.batch_prompts: prompts decoded per call (0 = all at once); the last batch is padded
  # with repeats of its last prompt, so every call has the same shape (one compile)
  batch_prompts: int = 0

  @property
  def prompts_per_call(self) -> int:
    """Prompts one decode call of the evaluation holds."""
    return self.batch_prompts or self.num_prompts

  def batches(self, n: int) -> list[tuple[int, int]]:
    """[start, stop) of each batch of n prompts."""
    size = self.batch_prompts or n
    return [(i, min(i + size, n)) for i in range(0, n, size)]


LAYOUTS = ("packed", "padded")


@dataclasses.dataclass(frozen=True)
class OptimPlan:
  adamw: OptimConfig  # optim.{lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, clip_norm}
  ppo_epochs: int  # optim.ppo_epochs
  micro_batch_rows: int  # optim.micro_batch_rows: learner rows per micro-batch (0: all)
  layout: str  # optim.layout: packed (sequences end to end) | padded (one per row)
  remat: bool  # optim.remat
  max_bad_steps: int  # optim.max_bad_steps

  def __post_init__(self):
    if self.ppo_epochs < 1 or self.micro_batch_rows < 0 or self.max_bad_steps < 1:
      raise ValueError(
        f"optim.ppo_epochs={self.ppo_epochs} and optim.max_bad_steps={self.max_bad_steps} "
        f"must be >= 1, optim.micro_batch_rows={self.micro_batch_rows} >= 0"
      )
    if self.layout not in LAYOUTS:
      raise ValueError(f"optim.layout={self.layout!r}: use one of {LAYOUTS}")


@dataclasses.dataclass(frozen=True)
class RunPlan:
  stages: tuple[StagePlan, ...]
  data: DataPlan
  eval: EvalPlan
  optim: OptimPlan

  @property
  def stage_names(self) -> list[str]:
    return [s.name for s in self.stages]

  @property
  def total_steps(self) -> int:
    return sum(s.steps for s in self.stages)


# -- building ------------------------------------------------------------------------------


@contextlib.contextmanager
def _section(name: str):
  """Prefix a dataclass's validation error with the config section it was built from."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"config section '{name}': {e}") from None


def _loss(c, kl_coef: float, exclude_masked_from_denominator: bool = True) -> LossConfig:
  """loss.* with one stage's KL weight; a weight of 0 means no KL term (and no reference)."""
  l = c.loss
  return LossConfig(
    eps_low=l.eps_low,
    eps_high=l.eps_high,
    dual_clip_c=l.dual_clip_c or None,  # loss.dual_clip_c = 0: off
    kl_kind=None if kl_coef == 0 or l.kl_kind == "none" else l.kl_kind,
    kl_coef=float(kl_coef),
    entropy_coef=l.entropy_coef,
    agg_mode=l.agg_mode,
    max_len_norm=c.rollout.max_new_tokens,
    exclude_masked_from_denominator=exclude_masked_from_denominator,
    entropy_select=l.entropy_select,
    rho=l.rho,
    high_entropy_weight=l.high_entropy_weight,
    vocab_chunk=l.vocab_chunk,
  )


def _check_kl(c, section: str) -> None:
  coef = c[section].kl_coef
  if coef < 0:
    raise ValueError(f"{section}.kl_coef={coef} must be >= 0 (0: no KL term in this stage)")
  if coef > 0 and c.loss.kl_kind == "none":
    raise ValueError(
      f"{section}.kl_coef={coef} > 0 but loss.kl_kind='none': set loss.kl_kind=k3 (or k1/k2) "
      "to choose the KL estimator"
    )


def _compress(c, common) -> StagePlan:
  s = c.compress
  with _section("compress"):
    name = "egrc_compress" if s.shaping == "exp" else "linear_compress"
    reward = RewardConfig(
      name=name, max_len=c.rollout.max_new_tokens, r=s.r, shaping=s.shaping,
      clip_truncated=s.clip_truncated,
    )  # fmt: skip
    return StagePlan(
      name="compress",
      steps=s.steps,
      sampling=common.sampling(s.temperature),
      reward=reward,
      advantage=AdvantageConfig(kind=s.advantage, beta=s.beta),
      loss=_loss(c, s.kl_coef, exclude_masked_from_denominator=not s.excluded_in_denominator),
      switch=None,
      recompute_old_logprobs=common.recompute,
    )


def _enhance(c, common) -> StagePlan:
  s = c.enhance
  with _section("enhance"):
    reward = RewardConfig(
      name="egrc_enhance", max_len=c.rollout.max_new_tokens, r=s.r, shaping=s.shaping,
      w_len=s.w_len, clip_truncated=s.clip_truncated,
    )  # fmt: skip
    kind = "decomposed" if s.decompose else "group"
    return StagePlan(
      name="enhance",
      steps=s.steps,
      sampling=common.sampling(s.temperature),
      reward=reward,
      advantage=AdvantageConfig(kind=kind, w_len=s.w_len, std_normalize=s.std_normalize),
      loss=_loss(c, s.kl_coef),
      switch=None,
      recompute_old_logprobs=common.recompute,
    )


def _single(c, common, name: str, reward_name: str) -> StagePlan:
  s = c.single
  with _section("single"):
    reward = RewardConfig(
      name=reward_name, max_len=c.rollout.max_new_tokens, r=s.r, shaping=s.shaping,
      w_len=s.w_len, clip_truncated=s.clip_truncated, l1_alpha=s.l1_alpha,
      n_target=s.n_target, kimi_weight=s.kimi_weight, az_alpha=s.az_alpha,
      sb_correct_weight=s.sb_correct_weight, sb_beta=s.sb_beta, buffer=s.buffer,
      dapo_scale=s.dapo_scale, dapo_signed=s.dapo_signed,
    )  # fmt: skip
    return StagePlan(
      name=name,
      steps=s.steps,
      sampling=common.sampling(s.temperature),
      reward=reward,
      advantage=AdvantageConfig(kind="group", std_normalize=s.std_normalize),
      loss=_loss(c, s.kl_coef),
      switch=None,
      recompute_old_logprobs=common.recompute,
    )


def decode_loop_settings(c) -> dict:
  """The decode loop's SamplingConfig fields (rollout.loop, ...), shared by the rollouts and
  the evaluation."""
  r = c.rollout
  return dict(
    loop=r.loop,
    num_slots=r.num_slots,
    shrink_levels=r.shrink_levels,
    kv_layout=r.kv_layout,
    page_size=r.page_size,
  )


@dataclasses.dataclass(frozen=True)
class _Common:
  """What every stage's plan shares: the rollout's filters, budget and decode loop."""

  top_p: float
  top_k: int
  max_new_tokens: int
  prompt_buckets: tuple[int, ...]
  recompute: bool
  loop: tuple[tuple[str, object], ...]  # decode_loop_settings

  def sampling(self, temperature: float) -> SamplingConfig:
    return SamplingConfig(
      temperature=temperature,
      top_p=self.top_p,
      top_k=self.top_k,
      max_new_tokens=self.max_new_tokens,
      prompt_buckets=self.prompt_buckets,
      **dict(self.loop),
    )


def stage_plans(c) -> tuple[StagePlan, ...]:
  """The stages of config.arm, in order."""
  r = c.rollout
  if r.recompute_old_logprobs not in ("auto", "always", "never"):
    raise ValueError(
      f"rollout.recompute_old_logprobs={r.recompute_old_logprobs!r}: use auto, always or never"
    )
  filtered = r.top_p < 1.0 or r.top_k > 0
  recompute = r.recompute_old_logprobs == "always" or (
    r.recompute_old_logprobs == "auto" and filtered
  )
  with _section("rollout"):
    loop = tuple(decode_loop_settings(c).items())
    common = _Common(r.top_p, r.top_k, r.max_new_tokens, tuple(r.prompt_buckets), recompute, loop)
    common.sampling(1.0)  # validates the shared sampling settings once, under their name
  table = {
    "egrc": lambda: (_compress(c, common), _enhance(c, common)),
    "reverse": lambda: (_enhance(c, common), _compress(c, common)),
    "compress": lambda: (_compress(c, common),),
    "enhance": lambda: (_enhance(c, common),),
    "ee": lambda: (_single(c, common, "ee", "ee"),),
    "grpo": lambda: (_single(c, common, "grpo", "accuracy"),),
    "baseline": lambda: (_single(c, common, "baseline", c.single.reward),),
  }
  if c.arm not in table:
    raise ValueError(f"arm={c.arm!r} does not exist; choose one of {ARMS}")
  stages = table[c.arm]()
  if c.switch.mode not in ("fixed", "entropy"):
    raise ValueError(f"switch.mode={c.switch.mode!r}: use fixed or entropy")
  if c.switch.mode == "entropy" and len(stages) == 2 and stages[0].name == "compress":
    with _section("switch"):
      sw = SwitchConfig(c.switch.window, c.switch.min_drop, c.switch.min_steps)
    stages = (dataclasses.replace(stages[0], switch=sw), stages[1])
  return stages


def data_config(c, benchmark: str, source: str, gold_rule: str, shuffle: bool) -> DataConfig:
  d = c.data
  with _section("data"):
    return DataConfig(
      benchmark=benchmark,
      source=source,
      gold_rule=gold_rule,
      data_root=d.data_root,
      batch_size=d.prompts_per_step,
      max_prompt_tokens=d.max_prompt_tokens,
      seed=c.seed,
      shuffle=shuffle,
      on_bad_row=d.on_bad_row,
      instruction=d.instruction,
      system_prompt=d.system_prompt,
      # Every process iterates the same global batches (prompts are small): the run is then
      # the same for any process count, and each process grades only its own rows.
      shard_index=0,
      shard_count=1,
    )


def data_plan(c) -> DataPlan:
  d = c.data
  if c.rollout.num_samples < 1:
    raise ValueError(f"rollout.num_samples={c.rollout.num_samples}: need G >= 1")
  train = data_config(c, d.train_benchmark, d.train_source, d.train_gold_rule, d.shuffle)
  evals = None
  if c.eval.num_prompts > 0 and (d.eval_benchmark or d.eval_source):
    evals = data_config(c, d.eval_benchmark, d.eval_source, d.eval_gold_rule, False)
  return DataPlan(train=train, eval=evals, num_samples=c.rollout.num_samples)


def eval_plan(c) -> EvalPlan:
  e = c.eval
  with _section("eval"):
    sampling = SamplingConfig(
      temperature=e.temperature,
      top_p=e.top_p,
      max_new_tokens=e.max_new_tokens,
      prompt_buckets=tuple(c.rollout.prompt_buckets),
      **decode_loop_settings(c),
    )
    if e.every < 0 or e.num_prompts < 0 or e.num_samples < 1 or e.batch_prompts < 0:
      raise ValueError(
        f"eval.every={e.every}, eval.num_prompts={e.num_prompts} and eval.batch_prompts="
        f"{e.batch_prompts} must be >= 0 and eval.num_samples={e.num_samples} >= 1"
      )
  return EvalPlan(e.every, e.num_prompts, e.num_samples, sampling, e.batch_prompts)


def optim_plan(c) -> OptimPlan:
  o = c.optim
  rows = c.data.prompts_per_step * c.rollout.num_samples
  if o.micro_batch_rows < 0 or (o.micro_batch_rows and rows % o.micro_batch_rows):
    raise ValueError(
      f"optim.micro_batch_rows={o.micro_batch_rows} must divide the rollout batch "
      f"(data.prompts_per_step * rollout.num_samples = {rows}), or be 0 (one micro-batch)"
    )
  adamw = OptimConfig(
    lr=o.lr,
    warmup_steps=o.warmup_steps,
    min_lr_ratio=o.min_lr_ratio,
    weight_decay=o.weight_decay,
    b1=o.b1,
    b2=o.b2,
    clip_norm=o.clip_norm,
  )
  with _section("optim"):
    return OptimPlan(adamw, o.ppo_epochs, o.micro_batch_rows, o.layout, o.remat, o.max_bad_steps)


def build_plan(c: ml_collections.ConfigDict) -> RunPlan:
  """The typed plan of a (finalized) run config; raises ValueError naming the bad key."""
  for section in ("compress", "enhance", "single"):
    _check_kl(c, section)
  return RunPlan(stages=stage_plans(c), data=data_plan(c), eval=eval_plan(c), optim=optim_plan(c))


def bind_tokens(sampling: SamplingConfig, stop_token_ids, pad_id: int) -> SamplingConfig:
  """A plan's sampling settings with the run tokenizer's stop tokens and pad id."""
  return sampling.replace(stop_token_ids=tuple(stop_token_ids), pad_id=int(pad_id))
