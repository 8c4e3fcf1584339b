"""Sampler vs learner log-probabilities of the same tokens, per compute dtype (CPU).

  python -m egrc_jax.bench.logprob_mismatch
  PYTHONPATH=OTHER_CHECKOUT python egrc_jax/bench/logprob_mismatch.py   # another version

A tiny random Qwen2 (vocab 272, hidden 64, 2 layers, 4 heads / 2 kv heads; every weight
random, norms 1 + noise) samples G = 4 completions of 48 tokens for 8 random prompts at
temperature 0.6 (no top-p / top-k filter) with `egrc_jax.sampler.generate`; the learner
recomputes the same tokens' log-probabilities at 0.6 with `egrc_jax.train.
completion_logprobs` (full forward, vocab-chunked). Printed: max and mean |sampler -
learner| over the generated tokens, for float32 params with bfloat16 compute and for
float32 everywhere (and, where the checkout has attention_impl, per implementation).
Only public APIs that predate attention_impl are used, so an older checkout runs it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np
from flax import nnx

from egrc_jax.model import ModelConfig, positions_from_mask
from egrc_jax.sampler import SamplingConfig, generate
from egrc_jax.sharding import abstract_model
from egrc_jax.train import Batch, completion_logprobs


def random_model(cfg: ModelConfig, seed: int = 0):
  """Every parameter random (biases too), norm scales 1 + noise."""
  rng = np.random.default_rng(seed)
  graphdef, abstract = abstract_model(cfg)
  leaves = []
  for path, var in nnx.to_flat_state(abstract):
    x = 0.1 * rng.standard_normal(var.shape) + (1.0 if path[-1] == "scale" else 0.0)
    leaves.append((path, var.replace(np.asarray(x, np.float32).astype(var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def mismatch(cfg: ModelConfig, prompts, temperature: float, new_tokens: int, samples: int):
  model = random_model(cfg)
  scfg = SamplingConfig(temperature=temperature, max_new_tokens=new_tokens, pad_id=0)
  roll = generate(model, prompts, scfg, num_samples=samples, seed=0)
  tokens, mask = (np.asarray(x) for x in roll.full_sequence())
  B, C = np.asarray(roll.completion_tokens_BC).shape
  zeros = np.zeros((B, C), np.float32)
  fields = dict(
    tokens_BS=tokens,
    positions_BS=np.asarray(positions_from_mask(mask)),
    targets_BC=np.asarray(roll.completion_tokens_BC),
    old_logp_BC=zeros,
    ref_logp_BC=zeros,
    adv_BC=zeros,
    weight_BC=zeros,
    select_BC=zeros,
  )
  if "segments_BS" in Batch.__dataclass_fields__:  # today's layout fields
    Tp = np.asarray(roll.prompt_tokens_BTp).shape[1]
    fields.update(segments_BS=mask.astype(np.int32), completion_BC=mask[:, Tp:],
                  sampler_logp_BC=zeros, head_start=Tp - 1)  # fmt: skip
  else:  # an older checkout (PYTHONPATH=...): its padded Batch
    fields.update(mask_BS=mask)
  batch = Batch(**fields)
  learner = jax.jit(completion_logprobs, static_argnums=(1, 4))
  logp = lambda model: np.asarray(learner(*nnx.split(model)[::-1], batch, temperature, 96)[0])
  ours = logp(model)
  ref = logp(random_model(dataclasses.replace(cfg, param_dtype="float32", dtype="float32")))
  m = np.asarray(roll.completion_mask_BC)
  diff = lambda a, b: np.abs(a - b)[m]
  sampler = np.asarray(roll.logprobs_BC)
  d, ds, dl = diff(ours, sampler), diff(sampler, ref), diff(ours, ref)
  return {
    "max_abs": float(d.max()),
    "mean_abs": float(d.mean()),
    "sampler_vs_f32_ref_max": float(ds.max()),
    "learner_vs_f32_ref_max": float(dl.max()),
    "tokens": int(m.sum()),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--new-tokens", type=int, default=48)
  p.add_argument("--samples", type=int, default=4)
  p.add_argument("--out", default=None, help="write the figures as JSON here")
  a = p.parse_args(argv)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 272, n).tolist() for n in rng.integers(5, 21, 8)]
  has_impl = "attention_impl" in {f.name for f in dataclasses.fields(ModelConfig)}
  settings = {
    "params float32, compute bfloat16": dict(param_dtype="float32", dtype="bfloat16"),
    "float32 everywhere": dict(param_dtype="float32", dtype="float32"),
  }
  figs = {}
  for name, dtypes in settings.items():
    for impl in ("blocked", "dense") if has_impl else (None,):
      extra = {} if impl is None else {"attention_impl": impl}
      key = name if impl is None else f"{name}, attention {impl}"
      figs[key] = mismatch(
        ModelConfig(vocab_size=272, **dtypes, **extra),
        prompts,
        a.temperature,
        a.new_tokens,
        a.samples,
      )
      f = figs[key]
      print(f"{key:52s} max {f['max_abs']:.2e} mean {f['mean_abs']:.2e} ({f['tokens']} "
            f"tokens); vs f32 ref: sampler {f['sampler_vs_f32_ref_max']:.1e}, learner "
            f"{f['learner_vs_f32_ref_max']:.1e}")  # fmt: skip
  if a.out:
    with open(a.out, "w") as f:
      json.dump(figs, f, indent=2)
  return figs


if __name__ == "__main__":
  main()
