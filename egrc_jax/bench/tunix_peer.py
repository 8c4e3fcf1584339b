"""Tunix's vanilla sampler on the benchmark's weights: a peer for `egrc_jax.bench.continuous`.

Run only by the Tunix venv's python (google-tunix 0.1.7 is a benchmark peer, never a
dependency of egrc_jax; nothing imports this file):

  /work/venvs/tunix/bin/python egrc_jax/bench/tunix_peer.py JOB.json OUT.json

JOB.json: {"weights": {name: HF safetensors dir}, "model": {hidden, layers, heads, kv_heads,
intermediate, vocab}, "seed", "reps", "jobs": [{"name", "weights", "prompts" (token-id rows,
one per sampled row), "max_new", "greedy", "eos"}]}. Each job builds a fresh `Sampler`
(its stop ids are traced into the compiled loop), makes one warm-up call (compiles), then
`reps` timed calls; OUT.json gets wall seconds, tok/s (exactly max_new tokens per row) and
useful tokens/s (tokens up to and including the stop), lengths and tokens per job.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tunix.generate import sampler as sampler_lib
from tunix.models.qwen2 import model as qwen2
from tunix.models.qwen2 import params as qwen2_params


class IdTokenizer:
  """Text is space-separated token ids; no BOS (bos_id 0 is falsy to Tunix)."""

  def encode(self, text, **kw):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 0

  def eos_id(self):
    return 0

  def pad_id(self):
    return 0


def model_config(m: dict) -> qwen2.ModelConfig:
  return qwen2.ModelConfig(
    num_layers=m["layers"],
    vocab_size=m["vocab"],
    embed_dim=m["hidden"],
    hidden_dim=m["intermediate"],
    num_heads=m["heads"],
    head_dim=m["hidden"] // m["heads"],
    num_kv_heads=m["kv_heads"],
    rope_theta=10000,
    norm_eps=1e-6,
    use_tied_embedding=False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
  )


def run_job(model, cfg, job, seed, reps):
  prompts = [" ".join(map(str, p)) for p in job["prompts"]]
  Tp, C = max(len(p) for p in job["prompts"]), job["max_new"]
  cache = sampler_lib.CacheConfig(
    cache_size=Tp + C,
    num_layers=cfg.num_layers,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
  )
  sampler = sampler_lib.Sampler(model, IdTokenizer(), cache)
  kw = dict(max_generation_steps=C, max_prompt_length=Tp, eos_tokens=job["eos"], seed=seed)
  kw |= dict(temperature=0.0) if job["greedy"] else dict(temperature=1.0, top_p=1.0)
  call = lambda: sampler(prompts, **kw)
  out = call()  # warm-up: compiles prefill and the decode loop
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    out = call()
    best = min(best, time.perf_counter() - t)
  tokens = [np.asarray(t).tolist() for t in out.tokens]
  # Tunix cuts each row before its stop token; a row shorter than C did emit one.
  lengths = np.array([min(len(t) + 1, C) if len(t) < C else C for t in tokens])
  return {
    "wall_s": best,
    "tok_s": len(prompts) * C / best,
    "useful_tok_s": float(lengths.sum()) / best,
    "mean_length": float(lengths.mean()),
    "hit_L_frac": float((lengths == C).mean()),
    "rows": len(prompts),
    "tokens": tokens,
  }


def main(job_path, out_path):
  with open(job_path) as f:
    spec = json.load(f)
  cfg = model_config(spec["model"])
  models = {}
  result = {"tunix_jax": jax.__version__}
  for job in spec["jobs"]:
    if job["weights"] not in models:
      path = spec["weights"][job["weights"]]
      models[job["weights"]] = qwen2_params.create_model_from_safe_tensors(path, cfg)
    result[job["name"]] = run_job(models[job["weights"]], cfg, job, spec["seed"], spec["reps"])
    print(
      job["name"],
      {k: v for k, v in result[job["name"]].items() if k != "tokens"},
      file=sys.stderr,
      flush=True,
    )
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
