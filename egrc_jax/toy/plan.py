"""The toy reproduction's settings, read from the sections of configs/toy.py.

configs/toy.py is one config: the trainer's keys (the RL arms), plus the sections
  sft       SftConfig: the warm-start model and its optimisation (toy/sft.py)
  task      TaskConfig: the problem distribution (toy/task.py)
  cot       CotConfig: the verbose chains of thought of the SFT data (toy/task.py)
  pipeline  PipelineConfig (below): the seeds and the report's extras
and the trainer's `eval` section, which is the evaluation of every model (one temperature,
one budget, eval.num_prompts held-out problems) and of the exported generation config.
`toy_plan(config)` builds the typed settings once; `arm_config` derives each RL arm's
config from the same ConfigDict (no override strings).
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from egrc_jax import cli
from egrc_jax.toy.sft import SftConfig
from egrc_jax.toy.task import CotConfig, TaskConfig
from egrc_jax.trainer.config import finalize, from_section, load_config_spec
from egrc_jax.trainer.plan import decode_loop_settings

RL_ARMS = ("egrc", "ee", "reverse")  # the default pipeline.arms
# Every RL arm the pipeline can train: the trainer's arm of each, and what it is.
KNOWN_ARMS = {
  "egrc": "egrc",  # compress, then enhance (its stage-1 end is the compress-only model)
  "ee": "ee",  # one stage on the entangled reward, both stages' budget (single.steps)
  "reverse": "reverse",  # enhance, then compress
  "ee_star": "ee",  # EE* = EE trained longer: pipeline.ee_star_factor x EGRC's budget
}
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "toy.py")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  seeds: tuple[int, ...] = (0,)  # one run of every phase per seed (SFT seed = RL seed)
  high_entropy_prompts: int = 250  # test problems whose samples feed the high-entropy list
  hf_check_prompts: int = 3  # test prompts of the transformers-vs-sampler export check
  arms: tuple[str, ...] = RL_ARMS  # RL arms trained per seed (KNOWN_ARMS; egrc is required)
  ee_star_factor: float = 1.5  # EE*'s steps: this x EGRC's (compress.steps + enhance.steps)
  # The entropy-conflict diagnostics (Fig. 3a / 3d analogues, toy/conflict.py) of the SFT
  # model: G samples for each of this many test problems; 0 = off
  conflict_prompts: int = 0

  def __post_init__(self):
    unknown = [a for a in self.arms if a not in KNOWN_ARMS]
    if unknown or "egrc" not in self.arms or len(set(self.arms)) != len(self.arms):
      raise ValueError(
        f"pipeline.arms={self.arms}: give distinct arms of {tuple(KNOWN_ARMS)}, egrc among "
        "them (its stage-1 end is the compress-only model)"
      )
    if self.ee_star_factor <= 0 or self.conflict_prompts < 0:
      raise ValueError(
        f"pipeline.ee_star_factor={self.ee_star_factor} must be > 0 and "
        f"pipeline.conflict_prompts={self.conflict_prompts} >= 0"
      )
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"pipeline.seeds={self.seeds}: give one or more distinct seeds")
    if self.high_entropy_prompts < 1 or self.hf_check_prompts < 1:
      raise ValueError(
        f"pipeline.high_entropy_prompts={self.high_entropy_prompts} and "
        f"pipeline.hf_check_prompts={self.hf_check_prompts} must be >= 1"
      )


@dataclasses.dataclass(frozen=True)
class ToyPlan:
  config: ml_collections.ConfigDict  # the whole config (the arms derive theirs from it)
  sft: SftConfig
  task: TaskConfig
  cot: CotConfig
  pipeline: PipelineConfig
  eval_temperature: float  # eval.temperature (0: greedy)
  eval_max_new_tokens: int  # eval.max_new_tokens
  num_test: int  # eval.num_prompts: the held-out problems every model answers
  rho: float  # loss.rho: the high-entropy quantile of the token lists
  decode: dict  # rollout.{loop, num_slots, ...}: the evaluation's decode loop too

  @property
  def seeds(self) -> tuple[int, ...]:
    return self.pipeline.seeds


def toy_plan(c: ml_collections.ConfigDict) -> ToyPlan:
  """The typed toy settings of a configs/toy.py config (ValueError naming the section)."""
  for name in ("sft", "task", "cot", "pipeline"):
    if name not in c:
      raise ValueError(
        f"the config has no '{name}' section: the toy commands read configs/toy.py "
        "(--config=configs/toy.py[:overrides])"
      )
  parts = {}
  for name, cls in (("sft", SftConfig), ("task", TaskConfig), ("cot", CotConfig),
                    ("pipeline", PipelineConfig)):  # fmt: skip
    try:
      parts[name] = from_section(cls, c[name])
    except (TypeError, ValueError) as e:
      raise ValueError(f"config section '{name}': {e}") from None
  if c.eval.num_prompts < 1:
    raise ValueError(f"eval.num_prompts={c.eval.num_prompts}: the toy evaluates >= 1 problem")
  return ToyPlan(
    config=c,
    **parts,
    eval_temperature=c.eval.temperature,
    eval_max_new_tokens=c.eval.max_new_tokens,
    num_test=c.eval.num_prompts,
    rho=c.loss.rho,
    decode=decode_loop_settings(c),
  )


def arm_config(c: ml_collections.ConfigDict, arm: str, seed: int, seed_dir):
  """The RL config of one arm of one seed: the toy config with its SFT model and data."""
  seed_dir = pathlib.Path(seed_dir)
  a = c.copy_and_resolve_references()
  a.unlock()
  if arm not in KNOWN_ARMS:
    raise ValueError(f"unknown toy arm {arm!r}; known: {tuple(KNOWN_ARMS)}")
  a.arm, a.seed = KNOWN_ARMS[arm], seed
  if arm == "ee_star":
    factor = c.pipeline.ee_star_factor
    a.single.steps = int(round(factor * (c.compress.steps + c.enhance.steps)))
  a.model.hf_path = a.model.tokenizer_path = str(seed_dir / "sft")
  a.data.train_source = str(seed_dir / "data" / "train.jsonl")
  a.data.eval_source = str(seed_dir / "data" / "test.jsonl")
  a.export.hf = True
  if arm == "egrc":
    # Keep every checkpoint: stage 1's end is the compress-only model (a few MB each).
    a.checkpoint.keep = 1000
  return finalize(a)


def quick(c: ml_collections.ConfigDict) -> None:
  """The `quick` preset (tests/test_pipeline.py): a tiny SFT model trained for a few steps,
  2 RL steps per stage, 50 test problems; every phase runs in about a minute on 2 cores.
  Fewer re-checks keep responses within 64 tokens, and 150 SFT steps give a few correct
  answers, so the RL rewards are not all zero."""
  c.sft.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
               num_train=256, steps=150, batch_size=16, learning_rate=1e-2, log_every=50,
               pad_multiple=256)  # fmt: skip
  c.cot.recheck_prob = 0.3
  c.eval.num_prompts = 50
  c.eval.max_new_tokens = 64
  c.rollout.max_new_tokens = 64
  c.compress.steps = c.enhance.steps = c.single.steps = 2
  c.data.prompts_per_step = 8
  c.rollout.num_samples = 4
  c.checkpoint.every = 1
  c.grading.workers = 1
  c.pipeline.high_entropy_prompts = 50


def conflict(c: ml_collections.ConfigDict) -> None:
  """The `conflict` preset: the entropy-conflict variant of the task (docs/toy_conflict.md,
  frozen before the held-out seeds 3-5 ran). Chains start from a value in [1, 30]
  (task.start_max; the default 9), so about three steps in four start from a two-digit value:
  the steps the small model computes right only about half the time when it writes them
  directly, and reliably when it re-checks them from one-digit facts. Compression then costs
  accuracy. The SFT model writes ~225 tokens here, so the RL length limit L is 320 (at the
  default 192 more than half of its stage-1 samples were cut off, and then both objectives
  prefer short samples for that reason alone). Every arm of the report runs (EE* included)
  and the SFT model's entropy-conflict diagnostics are reported; every other setting is the
  default toy's."""
  c.task.start_max = 30
  c.rollout.max_new_tokens = 320
  c.pipeline.arms = ("egrc", "ee", "ee_star", "reverse")
  c.pipeline.conflict_prompts = 100


PRESETS = {"quick": quick, "conflict": conflict}


def toy_parser(prog: str, description: str) -> cli.Parser:
  """The command line every toy command shares: --config (configs/toy.py[:overrides])."""
  parser = cli.Parser(prog=prog, description=description)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="configs/toy.py[:overrides]")
  return parser


def plan_of(args) -> ToyPlan:
  """The ToyPlan of a toy command's --config."""
  return toy_plan(load_config_spec(args.config))
