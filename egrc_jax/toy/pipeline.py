"""The miniature EGRC reproduction end to end: SFT, the RL arms, evaluation, the report.

    python -m egrc_jax.toy.pipeline --workdir=runs/toy [--seeds=0,1,2] [--sft_steps=1000]
        [--rl_overrides=k=v,...] [--quick]

Per seed S, under DIR/seed<S>/:
  tokenizer/, data/{train,test}.jsonl, sft/, sft_metrics.json   SFT warm start with seed S
      (`toy.sft.train_sft`; skipped when sft/ exists, so a re-run resumes)
  egrc/, ee/, reverse/   trainer workdirs of configs/toy.py with arm=<name>, seed=S (a re-run
      resumes from their checkpoints; a finished arm, with hf_final/ and results.json, is
      skipped), each exporting its final model to <arm>/hf_final/
  eval.json              every model's evaluation (cached: a re-run does not repeat it)
and DIR/report.md, DIR/report.json, DIR/curves/seed<S>/curves.png, DIR/high_entropy/seed<S>/.

Compress-only is not a separate run: EGRC's first stage *is* the compress arm with the same
seed, data order and steps, so its stage-end checkpoint (the step where stage 2 begins) is the
compress-only model. Evaluation: every model (SFT, compress-only, EGRC, EE, reverse) on the
same held-out problems (the first num_test of data/test.jsonl), one sample each at T = 0.6
with at most 448 new tokens, sampler seed S (`toy.evaluate.evaluate`).

--quick is the shortened pipeline of tests/test_pipeline.py: a tiny SFT model trained for
a few steps, 2 RL steps per stage, 50 test problems.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import gc
import json
import logging
import pathlib
import shutil
import sys
import time

import numpy as np

from egrc_jax import cli
from egrc_jax.analysis import curves, high_entropy
from egrc_jax.data.chat import load_tokenizer
from egrc_jax.evaluate.model_io import restore_params
from egrc_jax.sampler import generate
from egrc_jax.toy import hf_check, report
from egrc_jax.toy import sft as sft_lib
from egrc_jax.toy import task as task_lib
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.checkpoint import load_sft, save_sft
from egrc_jax.toy.data import write_splits
from egrc_jax.toy.evaluate import evaluate, sampling_config
from egrc_jax.trainer.config import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[2]
RL_ARMS = ("egrc", "ee", "reverse")
# A tiny model, 2 RL steps per stage, 50 test problems: every phase runs in about a minute
# on 2 cores. Fewer re-checks keep responses within 64 tokens, and 150 SFT steps give a few
# correct answers, so the RL rewards are not all zero.
QUICK_SFT = dict(
  hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
  num_train=256, num_test=50, steps=150, batch_size=16, learning_rate=1e-2, log_every=50,
  pad_multiple=256, cot=task_lib.CotConfig(recheck_prob=0.3),
)  # fmt: skip
QUICK_MAX_NEW_TOKENS = 64
QUICK_RL = (
  "compress.steps=2,enhance.steps=2,single.steps=2,data.prompts_per_step=8,"
  f"rollout.num_samples=4,rollout.max_new_tokens={QUICK_MAX_NEW_TOKENS},checkpoint.every=1,"
  "grading.workers=1"
)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  seeds: tuple[int, ...] = (0,)
  sft: sft_lib.SftConfig = sft_lib.SftConfig()  # its seed is replaced by each run's seed
  rl_config: str = str(REPO / "configs" / "toy.py")  # the RL config file of every arm
  rl_overrides: str = ""  # extra key=value overrides for every arm (after the pipeline's)
  eval_temperature: float = 0.6  # the paper's evaluation temperature
  eval_max_new_tokens: int = 448  # the same budget for every model (prompt + 448 <= 512)
  rho: float = 0.2  # high-entropy quantile of the token list
  high_entropy_prompts: int = 250  # test problems whose samples feed the token list
  hf_check_prompts: int = 3  # test prompts of the transformers-vs-sampler check
  quick: bool = False

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds={self.seeds}: give one or more distinct seeds, e.g. 0,1,2")
    if not os.path.isfile(self.rl_config):
      raise FileNotFoundError(f"rl_config={self.rl_config!r} does not exist; pass --rl_config")
    if self.eval_max_new_tokens < 1 or self.hf_check_prompts < 1:
      raise ValueError(
        f"eval_max_new_tokens={self.eval_max_new_tokens} and hf_check_prompts="
        f"{self.hf_check_prompts} must be >= 1"
      )

  @property
  def num_test(self) -> int:
    return self.sft.num_test


class Progress:
  """One line per phase, with the time since the pipeline started."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.phases: dict[str, float] = {}

  def __call__(self, message: str) -> None:
    print(f"[pipeline {time.perf_counter() - self.t0:7.1f}s] {message}", flush=True)

  def timed(self, name: str, fn, *args, **kw):
    self(f"{name} ...")
    t = time.perf_counter()
    out = fn(*args, **kw)
    self.phases[name] = time.perf_counter() - t
    self(f"{name} done in {self.phases[name]:.1f}s")
    return out


# -- problems ----------------------------------------------------------------------------


def parse_problem(text: str, answer: str | int | None = None) -> task_lib.Problem:
  """The Problem whose text is `text` ("start 7 , add 5 , times 2 ."), checked against it."""
  parts = text.strip().rstrip(".").strip().split(" , ")
  head = parts[0].split()
  if len(head) != 2 or head[0] != "start":
    raise ValueError(f"not a toy problem: {text!r} (expected 'start N , op M , ... .')")
  ops = tuple((op, int(b)) for op, b in (p.split() for p in parts[1:]))
  p = task_lib.Problem(int(head[1]), ops)
  if p.text != text.strip() or (answer is not None and p.answer != int(answer)):
    raise ValueError(f"problem {text!r} (answer {answer}) does not round-trip: got {p.text!r}")
  return p


def load_problems(path, limit: int) -> list[task_lib.Problem]:
  rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
  if len(rows) < limit:
    raise ValueError(f"{path} holds {len(rows)} problems, fewer than the {limit} to evaluate")
  return [parse_problem(r["problem"], r["answer"]) for r in rows[:limit]]


# -- phases ------------------------------------------------------------------------------


def run_sft(seed_dir: pathlib.Path, cfg: sft_lib.SftConfig, log: Progress) -> dict:
  """Tokenizer, data splits and the SFT model of one seed (what `python -m egrc_jax.toy.sft`
  writes); the model is written to sft.tmp/ and renamed, so sft/ exists only when complete."""
  tokenizer = tok_lib.build_tokenizer(seed_dir / "tokenizer")
  train, test = task_lib.make_splits(cfg.task, cfg.num_train, cfg.num_test, seed=cfg.seed)
  write_splits(seed_dir / "data", train, test)
  t = time.perf_counter()
  model, history = sft_lib.train_sft(cfg, tokenizer, train, log=lambda m: log(f"  sft {m}"))
  tmp = seed_dir / "sft.tmp"
  save_sft(model, seed_dir / "tokenizer", tmp)
  tmp.rename(seed_dir / "sft")
  metrics = {"steps": cfg.steps, "train_seconds": time.perf_counter() - t,
             "final_loss": history[-1][1], "config": dataclasses.asdict(cfg)}  # fmt: skip
  (seed_dir / "sft_metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
  return metrics


def arm_overrides(cfg: PipelineConfig, seed_dir: pathlib.Path, arm: str, seed: int) -> str:
  parts = [
    f"model.hf_path={seed_dir / 'sft'}",
    f"data.train_source={seed_dir / 'data' / 'train.jsonl'}",
    f"data.eval_source={seed_dir / 'data' / 'test.jsonl'}",
    f"arm={arm}",
    f"seed={seed}",
    f"eval.num_prompts={cfg.num_test}",
    "export.hf=true",
  ]
  if arm == "egrc":
    # Keep every checkpoint: stage 1's end is the compress-only model (a few MB each).
    parts.append("checkpoint.keep=1000")
  if cfg.quick:
    parts.append(QUICK_RL)
  if cfg.rl_overrides:
    parts.append(cfg.rl_overrides)
  return ",".join(parts)


def run_arm(cfg: PipelineConfig, seed_dir: pathlib.Path, arm: str, seed: int) -> dict:
  """Train one arm (resuming), export hf_final/, write results.json; skip when finished."""
  from egrc_jax.trainer.loop import Trainer
  from egrc_jax.trainer.release import export_final

  workdir = seed_dir / arm
  done = workdir / "results.json"
  if done.is_file() and (workdir / "hf_final" / "config.json").is_file():
    return json.loads(done.read_text())
  config = load_config_file(cfg.rl_config, arm_overrides(cfg, seed_dir, arm, seed))
  trainer = Trainer(config, str(workdir))
  results = trainer.run()
  if results.get("stopped_early"):
    raise SystemExit(f"{arm} stopped early at step {results['global_step']}: re-run to resume")
  # (A run that had finished before this call holds its final params too: Trainer.run.)
  export_final(trainer, str(workdir / "hf_final"))
  done.write_text(json.dumps(results, indent=1, default=str) + "\n")
  del trainer
  gc.collect()
  return results


def switch_step(workdir: pathlib.Path) -> int:
  """The step where the run's second stage began (the first stage's last step)."""
  _, events = curves.read_metrics(str(workdir))
  steps = [s for s, _ in curves.stage_switches(events) if s > 0]
  if not steps:
    raise ValueError(f"{workdir}/metrics.jsonl records no second stage: is this a 2-stage arm?")
  return steps[0]


def final_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return workdir / "checkpoints" / str(steps[-1])


def load_models(seed_dir: pathlib.Path):
  """{name: loader} of the five models; each loader returns a Transformer."""
  egrc = seed_dir / "egrc"
  return {
    "sft": lambda: load_sft(seed_dir / "sft")[0],
    "compress_only": lambda: restore_params(egrc / "checkpoints" / str(switch_step(egrc)))[1],
    **{arm: (lambda a=arm: load_sft(seed_dir / a / "hf_final")[0]) for arm in RL_ARMS},
  }


def evaluate_all(cfg: PipelineConfig, seed_dir: pathlib.Path, seed: int, log: Progress) -> dict:
  """Every model on the same test problems; cached in eval.json per model and settings."""
  tokenizer = load_tokenizer(seed_dir / "tokenizer")
  problems = load_problems(seed_dir / "data" / "test.jsonl", cfg.num_test)
  settings = {"temperature": cfg.eval_temperature, "max_new_tokens": cfg.eval_max_new_tokens,
              "num_problems": cfg.num_test, "seed": seed}  # fmt: skip
  path = seed_dir / "eval.json"
  cache = json.loads(path.read_text()) if path.is_file() else {}
  if cache.get("settings") != settings:
    cache = {"settings": settings, "models": {}}
  for name, load in load_models(seed_dir).items():
    if name in cache["models"]:
      continue
    t = time.perf_counter()
    m = evaluate(load(), tokenizer, problems, temperature=cfg.eval_temperature,
                 max_new_tokens=cfg.eval_max_new_tokens, seed=seed)  # fmt: skip
    cache["models"][name] = m
    path.write_text(json.dumps(cache, indent=1) + "\n")
    log(f"  eval {name}: accuracy {m['accuracy']:.3f}  mean length {m['mean_length']:.1f}"
        f"  ({time.perf_counter() - t:.1f}s)")  # fmt: skip
  return cache["models"]


def high_entropy_tokens(cfg, seed_dir, seed, out: pathlib.Path) -> dict:
  """Top-rho entropy token strings of SFT and EGRC on the first test problems' samples (the
  evaluation's own samples: same prompts, seed and settings as its first batch)."""
  tokenizer = load_tokenizer(seed_dir / "tokenizer")
  problems = load_problems(seed_dir / "data" / "test.jsonl", cfg.num_test)
  problems = problems[: min(cfg.high_entropy_prompts, 250)]  # evaluate's first batch
  prompts = [tok_lib.encode_prompt(tokenizer, p.text) for p in problems]
  scfg = sampling_config(tokenizer, cfg.eval_temperature, cfg.eval_max_new_tokens)
  models = load_models(seed_dir)
  summaries = {}
  for name in ("sft", "egrc"):
    rollout = generate(models[name](), prompts, scfg, seed=seed)
    mask = np.asarray(rollout.completion_mask_BC, bool)
    tokens = np.asarray(rollout.completion_tokens_BC)[mask]
    entropy = np.asarray(rollout.entropy_BC)[mask]
    strings = [high_entropy.token_string(tokenizer.decode([int(t)])) for t in tokens]
    s = high_entropy.run_from_strings(strings, entropy.tolist(), str(out / name), cfg.rho,
                                      task_lib.CONNECTORS, f"{name} seed {seed}")  # fmt: skip
    summaries[name] = {k: v for k, v in s.items() if k != "counts"} | {"top": s["counts"][:20]}
  return summaries


def run_seed(cfg: PipelineConfig, workdir: pathlib.Path, seed: int, log: Progress) -> dict:
  seed_dir = workdir / f"seed{seed}"
  seed_dir.mkdir(parents=True, exist_ok=True)
  sft_cfg = dataclasses.replace(cfg.sft, seed=seed)
  if (seed_dir / "sft" / "config.json").is_file():
    log(f"seed {seed}: SFT found in {seed_dir / 'sft'}, skipped")
  else:
    shutil.rmtree(seed_dir / "sft.tmp", ignore_errors=True)
    log.timed(f"seed {seed}: SFT ({sft_cfg.steps} steps)", run_sft, seed_dir, sft_cfg, log)
  results = {}
  for arm in RL_ARMS:
    results[arm] = log.timed(f"seed {seed}: RL arm {arm}", run_arm, cfg, seed_dir, arm, seed)
  evals = log.timed(f"seed {seed}: evaluation", evaluate_all, cfg, seed_dir, seed, log)
  curve_dir = workdir / "curves" / f"seed{seed}"
  log.timed(f"seed {seed}: curves", curves.run, [str(seed_dir / a) for a in RL_ARMS],
            str(curve_dir), list(RL_ARMS))  # fmt: skip
  tokens = log.timed(f"seed {seed}: high-entropy tokens", high_entropy_tokens, cfg, seed_dir,
                     seed, workdir / "high_entropy" / f"seed{seed}")  # fmt: skip
  egrc = seed_dir / "egrc"
  problems = load_problems(seed_dir / "data" / "test.jsonl", cfg.hf_check_prompts)
  check = log.timed(
    f"seed {seed}: HF export check", hf_check.check_export, egrc / "hf_final",
    restore_params(final_checkpoint(egrc))[1], [p.text for p in problems],
    cfg.eval_max_new_tokens,
  )  # fmt: skip
  log(f"  transformers == sampler on {check['num_prompts']} prompts: {check['all_match']} "
      f"(max |logit diff| {check['max_abs_logit_diff']:.2e})")  # fmt: skip
  rows, _ = curves.read_metrics(str(egrc))
  return {
    "seed": seed,
    "eval": evals,
    "switch_step": switch_step(egrc),
    **{
      field: report.entropy_points(rows, switch_step(egrc), key=key)
      for field, (key, _) in report.ENTROPY_CURVES.items()
    },
    "entropy_trend": report.stage2_trend(rows, switch_step(egrc)),
    "high_entropy": tokens,
    "hf_check": check,
    "curves": str((curve_dir / "curves.png").relative_to(workdir)),
    "rl_results": results,
  }


def run(cfg: PipelineConfig, workdir) -> dict:
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  log = Progress()
  log(f"workdir {workdir}, seeds {list(cfg.seeds)}, SFT {cfg.sft.steps} steps, RL config "
      f"{cfg.rl_config}{' (quick)' if cfg.quick else ''}")  # fmt: skip
  seeds = {s: run_seed(cfg, workdir, s, log) for s in cfg.seeds}
  settings = dataclasses.asdict(cfg) | {
    "num_test": cfg.num_test,
    "rl_config_values": json.loads(
      load_config_file(cfg.rl_config, arm_overrides(cfg, workdir / f"seed{cfg.seeds[0]}",
                                                    "egrc", cfg.seeds[0])).to_json()
    ),
  }  # fmt: skip
  out = report.write_report(workdir, settings, seeds, log.phases)
  log(f"report: {out['md']} ({time.perf_counter() - log.t0:.0f}s in all)")
  print(report.headline(out["report"]), flush=True)
  return out["report"]


def parse_seeds(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"--seeds={text!r}: give comma-separated integers, e.g. 0,1,2") from None


def config_from_args(args) -> PipelineConfig:
  sft = sft_lib.SftConfig(**QUICK_SFT) if args.quick else sft_lib.SftConfig()
  if args.sft_steps:
    sft = dataclasses.replace(sft, steps=args.sft_steps)
  if args.num_test:
    sft = dataclasses.replace(sft, num_test=args.num_test)
  if args.cot:
    sft = dataclasses.replace(sft, cot=task_lib.cot_from_overrides(args.cot, sft.cot))
  return PipelineConfig(
    seeds=parse_seeds(args.seeds),
    sft=sft,
    rl_config=args.rl_config,
    rl_overrides=args.rl_overrides,
    eval_max_new_tokens=args.eval_max_new_tokens
    or (QUICK_MAX_NEW_TOKENS if args.quick else PipelineConfig.eval_max_new_tokens),
    high_entropy_prompts=50 if args.quick else PipelineConfig.high_entropy_prompts,
    quick=args.quick,
  )


def build_parser() -> cli.Parser:
  parser = cli.Parser(prog="python -m egrc_jax.toy.pipeline", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
  parser.add_argument("--sft_steps", type=int, default=0, help="0: the SFT default (1000)")
  parser.add_argument("--num_test", type=int, default=0, help="0: 500 (50 with --quick)")
  parser.add_argument("--rl_config", default=PipelineConfig.rl_config)
  parser.add_argument("--rl_overrides", default="", help="key=value,... for every RL arm")
  parser.add_argument("--cot", default="", help="SFT chain-of-thought knobs, key=value,...")
  parser.add_argument(
    "--eval_max_new_tokens", type=int, default=0,
    help="0: 448 (64 with --quick); the same budget for every model",
  )  # fmt: skip
  parser.add_argument("--quick", action="store_true", help="the test's shortened pipeline")
  return parser


def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  return run(config_from_args(args), args.workdir)


if __name__ == "__main__":
  sys.exit(cli.run(main))
