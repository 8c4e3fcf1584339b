"""Continuous batching vs the lock-step loop (and Tunix's vanilla sampler), on CPU.

  python -m egrc_jax.bench.continuous --out /tmp/bench_continuous.json   # the issue's sizes
  python -m egrc_jax.bench.continuous --small --skip-tunix              # a few minutes
  python -m egrc_jax.bench.continuous --tiny                            # seconds (tests)

Every figure and ratio comes from one run, on one set of random weights (a Qwen2 shape;
default hidden 512, 8 layers, vocab 32000, float32) and one set of prompts.

1. Long tail: P x G = 16 x 8 pairs, 128-token prompts, L = C = 512 new tokens, sampled at
   T = 1, top-p 1. The lm head is scaled down (near-uniform next-token distribution) and
   the k highest token ids are stop tokens, k = round(p V) with p = 1 - h^(1/(L-1)), so
   that lengths are geometric with a fraction h (default 0.2) hitting L. Both loops run the
   same prompts and seed; the tokens must be identical. Reported per loop: wall seconds
   (best of --reps after a warm-up, the loops interleaved), useful tokens (sum of lengths)
   per second and the ratio to lock-step, slot utilisation (active slot-steps over
   slot-steps; lock-step: sum(len - 1) / (P G (max len - 1))), KV bytes per layer against
   P*G*(Tp + C) token slots. Also the lock-step loop on its last prompts alone (as many rows
   as the fewest slots) against the same pairs of its full batch: how far the reference
   itself is from bitwise independent of the batch around a row.
2. Tunix (google-tunix 0.1.7, its own venv, a separate process fed the same weights as a
   safetensors directory): fixed length (8 prompts x G 8, 128-token prompts, exactly 128 new
   tokens; greedy and sampled T 1, top-p 1) and the long tail above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from egrc_jax.model import ModelConfig
from egrc_jax.sampler import SamplingConfig, generate
from egrc_jax.sampler.continuous import continuous_rollout
from egrc_jax.sampler.layouts import kv_layout_bytes
from egrc_jax.sharding import init_model

TUNIX_PYTHON = "/work/venvs/tunix/bin/python"
PEER = os.path.join(os.path.dirname(__file__), "tunix_peer.py")
RESULT_KEYS = ("config", "machine", "long_tail", "fixed", "tunix", "ratios")
SIZES = {
  # name: (hidden, layers, heads, kv heads, intermediate, vocab,
  #        long tail: P, G, prompt len, L; fixed length: P, G, prompt len, new tokens)
  "default": (512, 8, 8, 4, 1408, 32000, 16, 8, 128, 512, 8, 8, 128, 128),
  "small": (256, 4, 4, 2, 704, 8000, 16, 8, 64, 512, 8, 8, 64, 64),
  "tiny": (64, 2, 4, 2, 128, 512, 4, 4, 8, 32, 2, 2, 8, 8),
}
FIELDS = (
  "hidden",
  "layers",
  "heads",
  "kv_heads",
  "intermediate",
  "vocab",
  "prompts",
  "samples",
  "prompt_len",
  "max_new",
  "fixed_prompts",
  "fixed_samples",
  "fixed_prompt_len",
  "fixed_new",
)


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  size = p.add_mutually_exclusive_group()
  size.add_argument("--small", action="store_true", help="a smaller model, a few minutes")
  size.add_argument("--tiny", action="store_true", help="seconds; for the test suite")
  for name in FIELDS:
    p.add_argument(
      f"--{name.replace('_', '-')}", type=int, default=None, help="override the preset"
    )
  p.add_argument("--hit-frac", type=float, default=0.2, help="h: share of rows that reach L")
  p.add_argument("--head-scale", type=float, default=0.1, help="lm head scale (long tail)")
  p.add_argument("--slots", default="32,64", help="continuous slot counts to time")
  p.add_argument(
    "--reps", type=int, default=1, help="timed runs per loop (best kept; 0: time the first)"
  )
  p.add_argument("--shrink-levels", type=int, default=SamplingConfig.shrink_levels)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-tunix", action="store_true", help="no Tunix peer")
  p.add_argument("--skip-tunix-long-tail", action="store_true", help="Tunix fixed length only")
  p.add_argument("--skip-paged", action="store_true", help="no split / paged layout runs")
  p.add_argument("--skip-fixed", action="store_true", help="no fixed-length comparison")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  a = p.parse_args(argv)
  preset = SIZES["small" if a.small else "tiny" if a.tiny else "default"]
  for k, v in zip(FIELDS, preset, strict=True):
    if getattr(a, k) is None:
      setattr(a, k, v)
  a.slot_counts = [int(s) for s in a.slots.split(",") if s]
  return a


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def model_config(a) -> ModelConfig:
  return ModelConfig(
    vocab_size=a.vocab,
    hidden_size=a.hidden,
    intermediate_size=a.intermediate,
    num_layers=a.layers,
    num_heads=a.heads,
    num_kv_heads=a.kv_heads,
    head_dim=a.hidden // a.heads,
    max_position_embeddings=max(4096, a.prompt_len + a.max_new),
  )


def stop_ids(vocab: int, L: int, hit_frac: float) -> tuple[int, ...]:
  """The k highest ids, k = round(p V): a near-uniform next-token distribution then stops
  with probability ~p per step, and a row reaches L with probability (1 - p)^(L - 1) = h."""
  p = 1.0 - hit_frac ** (1.0 / (L - 1))
  k = max(1, round(p * vocab))
  return tuple(range(vocab - k, vocab))


def lockstep_utilisation(lengths: np.ndarray) -> float:
  """Useful row-steps over computed row-steps of the lock-step loop: the first token
  comes from prefill, then the batch runs max(len) - 1 steps on every row."""
  steps = int(lengths.max()) - 1
  return float((lengths - 1).sum() / max(len(lengths) * steps, 1))


def _rollout(graphdef, state, prompts, cfg, G, seed):
  if cfg.loop == "lockstep":
    r = generate(nnx.merge(graphdef, state), prompts, cfg, num_samples=G, seed=seed)
    stats = None
  else:
    r, stats = continuous_rollout(graphdef, state, prompts, cfg, G, seed)
  jax.block_until_ready(r.completion_tokens_BC)
  return r, stats


def time_loops(graphdef, state, prompts, cfgs: dict, G: int, seed: int, reps: int) -> dict:
  """Warm every loop up (compiles), then time `reps` interleaved rounds; best kept."""
  out = {}
  for name, cfg in cfgs.items():
    t = time.perf_counter()
    r, stats = _rollout(graphdef, state, prompts, cfg, G, seed)
    out[name] = {"first_call_s": time.perf_counter() - t, "wall_s": float("inf"), "stats": stats}
    out[name]["rollout"] = r
  if reps == 0:
    for row in out.values():
      row["wall_s"] = row["first_call_s"]  # includes the compile
  for _ in range(reps):
    for name, cfg in cfgs.items():
      t = time.perf_counter()
      _rollout(graphdef, state, prompts, cfg, G, seed)
      out[name]["wall_s"] = min(out[name]["wall_s"], time.perf_counter() - t)
  return out


def _identical(a, b) -> dict:
  fields = ("completion_tokens_BC", "completion_mask_BC", "lengths_B", "truncated_B")
  same = all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in fields)
  diff = lambda f: float(np.abs(np.asarray(getattr(a, f)) - np.asarray(getattr(b, f))).max())
  rows_same = (np.asarray(a.completion_tokens_BC) == np.asarray(b.completion_tokens_BC)).all(1)
  return {
    "tokens_identical": same,
    "identical_pairs_frac": float(rows_same.mean()),
    "max_abs_logprob_diff": diff("logprobs_BC"),
    "max_abs_entropy_diff": diff("entropy_BC"),
  }


def long_tail(a, graphdef, state, mcfg) -> dict:
  rng = np.random.default_rng(a.seed)
  stops = stop_ids(a.vocab, a.max_new, a.hit_frac)
  prompts = rng.integers(1, a.vocab - len(stops), (a.prompts, a.prompt_len)).tolist()
  base = SamplingConfig(
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=a.max_new,
    stop_token_ids=stops,
    prompt_buckets=(a.prompt_len,),
  )
  cfgs = {"lockstep": base}
  for b in a.slot_counts:
    cfgs[f"continuous_{b}"] = base.replace(
      loop="continuous", num_slots=b, kv_layout="dense", shrink_levels=a.shrink_levels
    )
  b = a.slot_counts[0]
  for layout in () if a.skip_paged else ("split", "paged"):
    cfgs[f"{layout}_{b}"] = cfgs[f"continuous_{b}"].replace(kv_layout=layout)
  runs = time_loops(graphdef, state, prompts, cfgs, a.samples, a.seed, a.reps)
  ref = runs["lockstep"]["rollout"]
  lengths = np.asarray(ref.lengths_B)
  N, Tp, C = a.prompts * a.samples, a.prompt_len, a.max_new
  per_layer = lambda n_tokens: n_tokens * 2 * mcfg.num_kv_heads * mcfg.head_dim * 4
  result = {
    "stop_tokens": len(stops),
    "pairs": N,
    "mean_length": float(lengths.mean()),
    "hit_L_frac": float((lengths == C).mean()),
    "truncated_frac": float(np.asarray(ref.truncated_B).mean()),
    "useful_tokens": int(lengths.sum()),
    "lockstep_kv_token_slots_per_layer": N * (Tp + C),
    "lockstep_kv_bytes_per_layer": per_layer(N * (Tp + C)),
    "loops": {},
  }
  for name, r in runs.items():
    row = {k: r[k] for k in ("wall_s", "first_call_s")}
    row["useful_tok_s"] = result["useful_tokens"] / r["wall_s"]
    row |= _identical(ref, r["rollout"])
    if r["stats"] is None:
      row["slot_utilisation"] = lockstep_utilisation(lengths)
      row["decode_steps"] = int(lengths.max()) - 1
      row["kv_bytes_per_layer"] = result["lockstep_kv_bytes_per_layer"]
    else:
      s = r["stats"]
      kv = kv_layout_bytes(mcfg, cfgs[name], a.prompts, Tp, s["num_slots"], s["layout"])
      row["slot_utilisation"] = s["slot_utilisation"]
      row["decode_steps"] = s["steps"]
      row["num_slots"] = s["num_slots"]
      row["kv_bytes_per_layer"] = (kv["prompt"] + kv["completion"]) // mcfg.num_layers
    row["kv_ratio_to_lockstep"] = row["kv_bytes_per_layer"] / result["lockstep_kv_bytes_per_layer"]
    row["useful_tok_s_vs_lockstep"] = row["useful_tok_s"] * runs["lockstep"]["wall_s"]
    row["useful_tok_s_vs_lockstep"] /= result["useful_tokens"]
    result["loops"][name] = row
    _log(f"long tail {name}: {row}")
  result["lockstep_alone"] = lockstep_alone(graphdef, state, prompts, base, a, ref)
  _log(f"long tail, lock-step on its last prompts alone: {result['lockstep_alone']}")
  result["prompts"] = prompts
  return result


def lockstep_alone(graphdef, state, prompts, cfg, a, ref) -> dict:
  """The reference's own sensitivity to its batch: the lock-step loop on the last n prompts
  alone (n G rows, as many as the fewest continuous slots; their prompt ids kept), against
  the same pairs in the full lock-step batch. Identical keys and shapes per row; only the
  batch around the rows differs."""
  P, G = len(prompts), a.samples
  n = max(1, min(P, a.slot_counts[0] // G if a.slot_counts else P // 2))
  ids = list(range(P - n, P))
  r = generate(
    nnx.merge(graphdef, state), prompts[P - n :], cfg, num_samples=G, seed=a.seed, prompt_ids=ids
  )
  rows = slice((P - n) * G, P * G)
  same = (np.asarray(r.completion_tokens_BC) == np.asarray(ref.completion_tokens_BC)[rows]).all(1)
  return {"prompts": n, "rows": n * G, "identical_pairs_frac": float(same.mean())}


def fixed_length(a, graphdef, state) -> dict:
  """The issue's Tunix setting: every row decodes exactly `fixed_new` tokens (no stop)."""
  rng = np.random.default_rng(a.seed + 1)
  prompts = rng.integers(1, a.vocab, (a.fixed_prompts, a.fixed_prompt_len)).tolist()
  N = a.fixed_prompts * a.fixed_samples
  out = {"prompts": prompts, "modes": {}}
  for mode, kw in (("greedy", dict(greedy=True)), ("sampled", dict(temperature=1.0, top_p=1.0))):
    base = SamplingConfig(max_new_tokens=a.fixed_new, prompt_buckets=(a.fixed_prompt_len,), **kw)
    cont = base.replace(loop="continuous", num_slots=N, shrink_levels=a.shrink_levels)
    cfgs = {"lockstep": base, "continuous": cont}
    runs = time_loops(graphdef, state, prompts, cfgs, a.fixed_samples, a.seed, a.reps)
    out["modes"][mode] = {}
    for name, r in runs.items():
      row = {"wall_s": r["wall_s"], "tok_s": N * a.fixed_new / r["wall_s"]}
      row |= _identical(runs["lockstep"]["rollout"], r["rollout"])
      out["modes"][mode][name] = row
      _log(f"fixed {mode} {name}: {row}")
    if mode == "greedy":
      tokens = runs["lockstep"]["rollout"].completion_tokens_BC
      out["modes"][mode]["greedy_tokens"] = np.asarray(tokens)
  return out


def tunix_jobs(a, fixed: dict, tail: dict | None) -> list[dict]:
  """The peer's runs: Tunix gets the P*G rows (it has no prompt sharing)."""
  rows = lambda ps, G: [p for p in ps for _ in range(G)]
  jobs = []
  for mode in () if a.skip_fixed else ("greedy", "sampled"):
    jobs.append(
      {
        "name": f"fixed_{mode}",
        "weights": "fixed",
        "prompts": rows(fixed["prompts"], a.fixed_samples),
        "max_new": a.fixed_new,
        "greedy": mode == "greedy",
        "eos": [a.vocab],  # never sampled: every row decodes max_new tokens
      }
    )
  if tail is not None:
    jobs.append(
      {
        "name": "long_tail",
        "weights": "long_tail",
        "prompts": rows(tail["prompts"], a.samples),
        "max_new": a.max_new,
        "greedy": False,
        "eos": list(stop_ids(a.vocab, a.max_new, a.hit_frac)),
      }
    )
  return jobs


def run_tunix(a, weight_dirs: dict, jobs: list[dict]) -> dict:
  """The Tunix peer in its own venv, as a separate process: the same weights through HF
  safetensors directories (`weight_dirs`: name -> dir), results back as JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    job = {"weights": weight_dirs, "jobs": jobs, "seed": a.seed, "reps": a.reps}
    job["model"] = {f: getattr(a, f) for f in FIELDS[:6]}
    with open(os.path.join(tmp, "job.json"), "w") as f:
      json.dump(job, f)
    out_path = os.path.join(tmp, "out.json")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    proc = subprocess.run(
      [TUNIX_PYTHON, PEER, os.path.join(tmp, "job.json"), out_path],
      capture_output=True,
      text=True,
      env=env | {"JAX_PLATFORMS": "cpu"},
    )
    if proc.returncode:
      raise RuntimeError(f"the Tunix peer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out_path) as f:
      return json.load(f)


def greedy_agreement(ours_BC: np.ndarray, theirs: list[list[int]]) -> dict:
  """How far Tunix's greedy rows follow ours (same weights): a check of the weight
  conversion. Position-wise equality, and the mean length of the common prefix."""
  theirs_BC = np.asarray(theirs)[:, : ours_BC.shape[1]]
  same = ours_BC == theirs_BC
  prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
  return {"token_match_frac": float(same.mean()), "mean_common_prefix": float(prefix.mean())}


def run(a) -> dict:
  from egrc_jax.hf.export import export_model

  mcfg = model_config(a)
  model = init_model(mcfg, seed=a.seed)
  result = {
    "config": {k: v for k, v in vars(a).items() if k != "out"} | {"params": mcfg.num_params()},
    "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "device": str(jax.devices()[0])},
  }
  with tempfile.TemporaryDirectory() as tmp:
    dirs = {"fixed": os.path.join(tmp, "fixed"), "long_tail": os.path.join(tmp, "long_tail")}
    if not a.skip_tunix:
      export_model(model, dirs["fixed"], dtype="float32")
    fixed = {"modes": {}} if a.skip_fixed else fixed_length(a, *nnx.split(model))
    # The long tail: the same weights with the lm head scaled down (near-uniform next token).
    model.lm_head_DV.set_value(model.lm_head_DV[...] * a.head_scale)
    tail = long_tail(a, *nnx.split(model), mcfg)
    tunix = {}
    if not a.skip_tunix:
      export_model(model, dirs["long_tail"], dtype="float32")
      jobs = tunix_jobs(a, fixed, None if a.skip_tunix_long_tail else tail)
      tunix = run_tunix(a, dirs, jobs)
      if not a.skip_fixed:
        ours = fixed["modes"]["greedy"]["greedy_tokens"]
        tunix["fixed_greedy"] |= greedy_agreement(ours, tunix["fixed_greedy"].pop("tokens"))
      for row in tunix.values():
        if isinstance(row, dict):
          row.pop("tokens", None)
      _log(f"tunix: {tunix}")
  fixed["modes"].get("greedy", {}).pop("greedy_tokens", None)
  tail.pop("prompts")
  fixed.pop("prompts", None)
  return result | {
    "long_tail": tail,
    "fixed": fixed,
    "tunix": tunix,
    "ratios": ratios(tail, fixed, tunix),
  }


def ratios(tail: dict, fixed: dict, tunix: dict) -> dict:
  r = {}
  lock = tail["loops"]["lockstep"]
  for name, row in tail["loops"].items():
    if name != "lockstep":
      r[f"long_tail_{name}_vs_lockstep"] = row["useful_tok_s"] / lock["useful_tok_s"]
  for mode, rows in fixed["modes"].items():
    for name in ("lockstep", "continuous"):
      t = tunix.get(f"fixed_{mode}")
      if t:
        r[f"fixed_{mode}_{name}_vs_tunix"] = rows[name]["tok_s"] / t["tok_s"]
  t = tunix.get("long_tail")
  if t:
    best = max(row["useful_tok_s"] for name, row in tail["loops"].items() if name != "lockstep")
    r["long_tail_best_continuous_vs_tunix"] = best / t["useful_tok_s"]
    r["long_tail_lockstep_vs_tunix"] = lock["useful_tok_s"] / t["useful_tok_s"]
  return r


def table(res: dict) -> str:
  c, t = res["config"], res["long_tail"]
  lines = [
    f"model {c['params'] / 1e6:.1f}M params (hidden {c['hidden']}, {c['layers']} layers, "
    f"vocab {c['vocab']}); machine {res['machine']}",
    f"long tail: P x G = {c['prompts']} x {c['samples']}, Tp {c['prompt_len']}, "
    f"L {c['max_new']}, {t['stop_tokens']} stop ids; mean length {t['mean_length']:.0f}, "
    f"{t['hit_L_frac']:.0%} hit L",
    f"{'loop':16} {'wall s':>8} {'useful tok/s':>13} {'vs lock':>8} {'util':>6} {'steps':>6} "
    f"{'KV/layer MiB':>13} {'KV ratio':>9} {'same tokens':>12}",
  ]
  for name, row in t["loops"].items():
    lines.append(
      f"{name:16} {row['wall_s']:8.2f} {row['useful_tok_s']:13.1f} "
      f"{row['useful_tok_s_vs_lockstep']:8.2f} {row['slot_utilisation']:6.1%} "
      f"{row['decode_steps']:6d} {row['kv_bytes_per_layer'] / 2**20:13.2f} "
      f"{row['kv_ratio_to_lockstep']:9.3f} {str(row['tokens_identical']):>12}"
    )
  alone = t.get("lockstep_alone")
  if alone:
    lines.append(
      f"lock-step on its last {alone['prompts']} prompts alone ({alone['rows']} rows) against "
      f"the same pairs in the full batch: {alone['identical_pairs_frac']:.1%} identical"
    )
  lines.append(
    f"fixed length: {c['fixed_prompts']} prompts x G {c['fixed_samples']}, Tp "
    f"{c['fixed_prompt_len']}, {c['fixed_new']} new tokens"
  )
  for mode, rows in res["fixed"]["modes"].items():
    for name, row in rows.items():
      lines.append(
        f"  {mode:8} {name:11} {row['tok_s']:9.1f} tok/s  same {row['tokens_identical']}"
      )
    tx = res["tunix"].get(f"fixed_{mode}")
    if tx:
      lines.append(f"  {mode:8} {'tunix':11} {tx['tok_s']:9.1f} tok/s")
  tx = res["tunix"].get("long_tail")
  if tx:
    lines.append(
      f"  long tail tunix: {tx['useful_tok_s']:.1f} useful tok/s (mean length "
      f"{tx['mean_length']:.0f}, {tx['hit_L_frac']:.0%} hit L)"
    )
  lines += [f"{k}: {v:.2f}" for k, v in res["ratios"].items()]
  return "\n".join(lines)


def main(argv=None) -> dict:
  a = _args(argv)
  result = run(a)
  print(table(result))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
