"""The miniature EGRC reproduction end to end: SFT, the RL arms, evaluation, the report.

    python -m egrc_jax.toy.pipeline --workdir=runs/toy [--config=configs/toy.py[:overrides]]
        [--seeds=0,1,2]

Every setting is a key of configs/toy.py (`toy.plan`): e.g. `--config=configs/toy.py:quick`
(the test's shortened pipeline), `...:sft.steps=900,cot.recheck_prob=0.75`. --seeds sets
pipeline.seeds. Per seed S, under DIR/seed<S>/:
  tokenizer/, data/{train,test}.jsonl, sft/, sft_metrics.json   SFT warm start with seed S
      (`toy.sft.run_sft`; skipped when sft/ exists, so a re-run resumes)
  egrc/, ee/, reverse/   trainer workdirs of the config with arm=<name>, seed=S
      (`toy.plan.arm_config`; a re-run resumes from their checkpoints; a finished arm, with
      hf_final/ and results.json, is skipped), each exporting its final model to hf_final/
  eval.json              every model's evaluation (cached: a re-run does not repeat it)
  seed_result.json       the seed's part of the report, with the settings it was run with: a
      re-run with the same settings (any --seeds) reads it, so seeds run in separate processes
      on one DIR are combined by a last run with every seed
and DIR/report.md, DIR/report.json, DIR/curves/seed<S>/curves.png, DIR/high_entropy/seed<S>/.
Compiled programs are kept in DIR/compile_cache/ (XLA's persistent cache, keyed by the
program: the same numbers as a fresh compile), so the EE and reverse arms reuse what EGRC
compiled and a re-run or another seed compiles little; --compile-cache=DIR2 puts it
elsewhere, --compile-cache=none turns it off, and JAX_COMPILATION_CACHE_DIR, when set, wins.

Compress-only is not a separate run: EGRC's first stage *is* the compress arm with the same
seed, data order and steps, so its stage-end checkpoint (the switch step the run returns) is
the compress-only model. Evaluation: every model (SFT, compress-only, EGRC, EE, reverse) on
the same eval.num_prompts held-out problems, one sample each at eval.temperature with at
most eval.max_new_tokens new tokens, sampler seed S (`toy.evaluate.evaluate`).
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
import sys
import time

import jax
import numpy as np

from egrc_jax import cli
from egrc_jax.analysis import curves, high_entropy
from egrc_jax.data.chat import load_tokenizer
from egrc_jax.sampler import generate
from egrc_jax.toy import conflict, hf_check, report
from egrc_jax.toy import task as task_lib
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.checkpoint import load_sft
from egrc_jax.toy.evaluate import evaluate, sampling_config
from egrc_jax.toy.plan import DEFAULT_CONFIG, RL_ARMS, ToyPlan, arm_config, plan_of, toy_parser
from egrc_jax.toy.sft import run_sft
from egrc_jax.trainer.checkpoint import restore_params


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


def run_arm(plan: ToyPlan, seed_dir: pathlib.Path, arm: str, seed: int) -> dict:
  """Train one arm (resuming), export hf_final/, write results.json; skip when finished."""
  from egrc_jax.trainer.loop import Trainer
  from egrc_jax.trainer.release import export_final

  workdir = seed_dir / arm
  done = workdir / "results.json"
  if done.is_file() and (workdir / "hf_final" / "config.json").is_file():
    return json.loads(done.read_text())
  trainer = Trainer(arm_config(plan.config, arm, seed, seed_dir), str(workdir))
  results = trainer.run()
  if results.get("stopped_early"):
    raise RuntimeError(f"{arm} stopped early at step {results['global_step']}: re-run to resume")
  # (A run that had finished before this call holds its final params too: Trainer.run.)
  export_final(trainer, str(workdir / "hf_final"))
  done.write_text(json.dumps(results, indent=1, default=str) + "\n")
  del trainer
  gc.collect()
  return results


def switch_step(results: dict) -> int:
  """The step where a two-stage arm's second stage began (what its run returned)."""
  steps = results.get("switch_steps") or []
  if not steps:
    raise ValueError(f"the run's results {sorted(results)} record no stage switch")
  return int(steps[0])


def final_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return workdir / "checkpoints" / str(steps[-1])


def load_models(seed_dir: pathlib.Path, egrc_switch: int, arms=RL_ARMS):
  """{name: loader} of SFT, compress-only and each RL arm; each loader returns a Transformer."""
  egrc = seed_dir / "egrc"
  return {
    "sft": lambda: load_sft(seed_dir / "sft")[0],
    "compress_only": lambda: restore_params(egrc / "checkpoints" / str(egrc_switch))[1],
    **{arm: (lambda a=arm: load_sft(seed_dir / a / "hf_final")[0]) for arm in arms},
  }


def evaluate_all(plan: ToyPlan, seed_dir, seed: int, models, log: Progress) -> dict:
  """Every model on the same test problems; cached in eval.json per model and settings."""
  tokenizer = load_tokenizer(seed_dir / "tokenizer")
  problems = load_problems(seed_dir / "data" / "test.jsonl", plan.num_test)
  settings = {"temperature": plan.eval_temperature, "max_new_tokens": plan.eval_max_new_tokens,
              "num_problems": plan.num_test, "seed": seed}  # fmt: skip
  path = seed_dir / "eval.json"
  cache = json.loads(path.read_text()) if path.is_file() else {}
  if cache.get("settings") != settings:
    cache = {"settings": settings, "models": {}}
  for name, load in models.items():
    if name in cache["models"]:
      continue
    t = time.perf_counter()
    m = evaluate(load(), tokenizer, problems, temperature=plan.eval_temperature,
                 max_new_tokens=plan.eval_max_new_tokens, seed=seed,
                 decode=plan.decode)  # fmt: skip
    cache["models"][name] = m
    path.write_text(json.dumps(cache, indent=1) + "\n")
    log(f"  eval {name}: accuracy {m['accuracy']:.3f}  mean length {m['mean_length']:.1f}"
        f"  ({time.perf_counter() - t:.1f}s)")  # fmt: skip
  return cache["models"]


def high_entropy_tokens(plan: ToyPlan, seed_dir, seed, models, out: pathlib.Path) -> dict:
  """Top-rho entropy token strings of SFT and EGRC on the first test problems' samples (the
  evaluation's own samples: same prompts, seed and settings as its first batch)."""
  tokenizer = load_tokenizer(seed_dir / "tokenizer")
  problems = load_problems(seed_dir / "data" / "test.jsonl", plan.num_test)
  problems = problems[: min(plan.pipeline.high_entropy_prompts, 250)]  # evaluate's 1st batch
  prompts = [tok_lib.encode_prompt(tokenizer, p.text) for p in problems]
  scfg = sampling_config(tokenizer, plan.eval_temperature, plan.eval_max_new_tokens, plan.decode)
  summaries = {}
  for name in ("sft", "egrc"):
    rollout = generate(models[name](), prompts, scfg, seed=seed)
    mask = np.asarray(rollout.completion_mask_BC, bool)
    tokens = np.asarray(rollout.completion_tokens_BC)[mask]
    entropy = np.asarray(rollout.entropy_BC)[mask]
    strings = [high_entropy.token_string(tokenizer.decode([int(t)])) for t in tokens]
    s = high_entropy.run_from_strings(strings, entropy.tolist(), str(out / name), plan.rho,
                                      task_lib.CONNECTORS, f"{name} seed {seed}")  # fmt: skip
    summaries[name] = {k: v for k, v in s.items() if k != "counts"} | {"top": s["counts"][:20]}
  return summaries


def seed_key(plan: ToyPlan) -> dict:
  """What a seed's result depends on: every setting but the list of seeds."""
  key = settings_of(plan, "")
  del key["config"], key["seeds"]
  pipeline = dataclasses.asdict(plan.pipeline)
  del pipeline["seeds"]
  return json.loads(json.dumps(key | {"pipeline": pipeline}))


def run_seed(plan: ToyPlan, workdir: pathlib.Path, seed: int, log: Progress) -> dict:
  """One seed's phases and its part of the report; cached in DIR/seed<S>/seed_result.json."""
  seed_dir = workdir / f"seed{seed}"
  seed_dir.mkdir(parents=True, exist_ok=True)
  cached = seed_dir / "seed_result.json"
  key = seed_key(plan)
  if cached.is_file():
    saved = json.loads(cached.read_text())
    if saved.get("key") == key:
      log(f"seed {seed}: every phase done with these settings ({cached}), read")
      return saved["result"]
  result = seed_phases(plan, workdir, seed_dir, seed, log)
  try:
    text = json.dumps({"key": key, "result": result}, indent=1, default=_plain)
  except TypeError as e:  # the report still gets the result; only the cache is skipped
    log(f"seed {seed}: result not cached ({e})")
  else:  # written whole, then renamed: an interrupted write leaves no half file
    tmp = cached.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(cached)
  return result


def _plain(value):
  """JSON for the numpy values in a seed's result; anything else is refused (not cached)."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON")


def seed_phases(plan: ToyPlan, workdir: pathlib.Path, seed_dir: pathlib.Path, seed: int,
                log: Progress) -> dict:  # fmt: skip
  if (seed_dir / "sft" / "config.json").is_file():
    log(f"seed {seed}: SFT found in {seed_dir / 'sft'}, skipped")
  else:
    log.timed(f"seed {seed}: SFT ({plan.sft.steps} steps)", run_sft, plan, seed_dir, seed,
              lambda m: log(f"  sft {m}"))  # fmt: skip
  results = {}
  arms = plan.pipeline.arms
  for arm in arms:
    results[arm] = log.timed(f"seed {seed}: RL arm {arm}", run_arm, plan, seed_dir, arm, seed)
  switch = switch_step(results["egrc"])
  models = load_models(seed_dir, switch, arms)
  evals = log.timed(f"seed {seed}: evaluation", evaluate_all, plan, seed_dir, seed, models, log)
  curve_dir = workdir / "curves" / f"seed{seed}"
  log.timed(f"seed {seed}: curves", curves.run, [str(seed_dir / a) for a in arms],
            str(curve_dir), list(arms))  # fmt: skip
  tokens = log.timed(f"seed {seed}: high-entropy tokens", high_entropy_tokens, plan, seed_dir,
                     seed, models, workdir / "high_entropy" / f"seed{seed}")  # fmt: skip
  egrc = seed_dir / "egrc"
  problems = load_problems(seed_dir / "data" / "test.jsonl", plan.pipeline.hf_check_prompts)
  check = log.timed(
    f"seed {seed}: HF export check", hf_check.check_export, egrc / "hf_final",
    restore_params(final_checkpoint(egrc))[1], [p.text for p in problems],
    plan.eval_max_new_tokens,
  )  # fmt: skip
  log(f"  transformers == sampler on {check['num_prompts']} prompts: {check['all_match']} "
      f"(max |logit diff| {check['max_abs_logit_diff']:.2e})")  # fmt: skip
  rows, _ = curves.read_metrics(str(egrc))
  diagnostics = {}
  if plan.pipeline.conflict_prompts:
    out = workdir / "conflict" / f"seed{seed}"
    diagnostics = log.timed(f"seed {seed}: entropy-conflict diagnostics", conflict.run_for_seed,
                            plan, seed_dir, seed, models["sft"](), out)  # fmt: skip
    diagnostics["plots"] = str(out.relative_to(workdir))
  return {
    "seed": seed,
    "eval": evals,
    "switch_step": switch,
    **{
      field: report.entropy_points(rows, switch, key=key)
      for field, (key, _) in report.ENTROPY_CURVES.items()
    },
    "entropy_trend": report.stage2_trend(rows, switch),
    "high_entropy": tokens,
    "hf_check": check,
    "curves": str((curve_dir / "curves.png").relative_to(workdir)),
    "rl_results": results,
    **({"conflict": diagnostics} if diagnostics else {}),
  }


def settings_of(plan: ToyPlan, config_spec: str) -> dict:
  """What the report records of the run's settings (the whole config, as JSON)."""
  return {
    "config": config_spec,
    "seeds": list(plan.seeds),
    "num_test": plan.num_test,
    "eval_temperature": plan.eval_temperature,
    "eval_max_new_tokens": plan.eval_max_new_tokens,
    "sft": dataclasses.asdict(plan.sft),
    "cot": dataclasses.asdict(plan.cot),
    "task": dataclasses.asdict(plan.task),
    "rl_config_values": json.loads(plan.config.to_json()),
  }


def run(plan: ToyPlan, workdir, config_spec: str = DEFAULT_CONFIG) -> dict:
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  log = Progress()
  log(f"workdir {workdir}, seeds {list(plan.seeds)}, SFT {plan.sft.steps} steps, config "
      f"{config_spec}")  # fmt: skip
  seeds = {s: run_seed(plan, workdir, s, log) for s in plan.seeds}
  out = report.write_report(workdir, settings_of(plan, config_spec), seeds, log.phases)
  log(f"report: {out['md']} ({time.perf_counter() - log.t0:.0f}s in all)")
  print(report.headline(out["report"]), flush=True)
  return out["report"]


def parse_seeds(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"--seeds={text!r}: give comma-separated integers, e.g. 0,1,2") from None


def build_parser() -> cli.Parser:
  parser = toy_parser("python -m egrc_jax.toy.pipeline", __doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="", help="comma-separated, e.g. 0,1,2 (pipeline.seeds)")
  parser.add_argument(
    "--compile-cache",
    default="",
    help="folder of XLA's persistent compilation cache (default: WORKDIR/compile_cache; none: "
    "off; JAX_COMPILATION_CACHE_DIR, when set, wins)",
  )
  return parser


def compile_cache_folder(workdir, choice: str = "", current: str | None = None) -> str | None:
  """The folder of XLA's persistent compilation cache (module docstring): `current` (one set
  already: JAX_COMPILATION_CACHE_DIR or a caller's jax config) wins; `choice` "none" turns
  it off, another `choice` names it; by default WORKDIR/compile_cache. The EGRC arm's
  programs took 77 s of its 150 s to compile on a 2-core CPU (2026-12-08), and the other
  arms compile the same programs."""
  if current:
    return current
  if choice == "none":
    return None
  return str(
    (pathlib.Path(choice) if choice else pathlib.Path(workdir) / "compile_cache").absolute()
  )


def plan_from_args(args) -> ToyPlan:
  plan = plan_of(args)
  if args.seeds:
    pipeline = dataclasses.replace(plan.pipeline, seeds=parse_seeds(args.seeds))
    plan = dataclasses.replace(plan, pipeline=pipeline)
  return plan


def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  plan = plan_from_args(args)
  current = jax.config.jax_compilation_cache_dir
  folder = compile_cache_folder(args.workdir, args.compile_cache, current)
  if folder != current:  # None only when neither is set
    jax.config.update("jax_compilation_cache_dir", folder)
  return run(plan, args.workdir, args.config)


if __name__ == "__main__":
  sys.exit(cli.run(main))
