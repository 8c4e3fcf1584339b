"""Attention implementations at the toy learner's shapes (CPU): time and agreement.

  python -m egrc_jax.bench.attention                      # toy shapes, default blocks
  python -m egrc_jax.bench.attention --sweep 32/32/1,64/64/1,64/64/128,112/112/1
  python -m egrc_jax.bench.attention --tiny               # seconds; for the test suite

Attention alone: q [B, T, N, H], k/v [B, T, K, H] float32 (default 128 rows, T 224, 4 heads,
2 kv heads, head_dim 16), causal, left-padded rows (random pad lengths up to half the row).
For dense, blocked (and each --sweep "block_q/block_kv/block_b"), and
jax.nn.dot_product_attention (XLA; it takes the mask as a dense [B, 1, T, T] array and
has no segment ids): forward and forward+backward time (the min over --reps interleaved
rounds), the max |difference| of the output and of dq, dk, dv against dense, and each
time over dense's from the same run. The cotangent is zero on pad queries (as a masked
loss), since dot_product_attention gives pads a uniform average instead of 0.

Whole model: one forward+backward (gradient of the mean target log-prob w.r.t. every
parameter) of a toy-sized decoder (2 layers, hidden 64, MLP 192, vocab 300, same heads and
rows) with each attention_impl; "attention share" estimates attention's part of it as
2 x that implementation's standalone forward+backward time over the model's.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax.model import ModelConfig, attention, positions_from_mask
from egrc_jax.sharding import init_model

SIZES = {"toy": (128, 224, 4, 2, 16), "tiny": (8, 40, 4, 2, 8)}  # B, T, N, K, H


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="small shapes (a few seconds)")
  p.add_argument("--reps", type=int, default=7, help="interleaved timing rounds")
  p.add_argument("--sweep", default="", help="extra blocked configs: bq/bk/bb,... (bb 0: auto)")
  p.add_argument("--skip-model", action="store_true", help="attention only")
  p.add_argument("--out", default=None, help="write the figures as JSON here")
  return p.parse_args(argv)


def _inputs(B, T, N, K, H, seed=0):
  rng = np.random.default_rng(seed)
  pads = rng.integers(0, T // 2, B)
  mask = np.arange(T)[None, :] >= pads[:, None]
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  w = normal(B, T, N, H) * jnp.asarray(mask)[:, :, None, None]
  return normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H), w, jnp.asarray(mask)


def _dot_product_attention(q, k, v, seg):
  allowed = attention.allowed_mask(seg, causal=True)[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="xla")


def _impls(sweep: str) -> dict:
  impls = {
    "dense": attention.dense,
    "blocked": attention.blocked,
    "jax.nn.dot_product_attention": _dot_product_attention,
  }
  for item in filter(None, sweep.split(",")):
    bq, bk, bb = (int(x) for x in item.split("/"))
    impls[f"blocked {item}"] = functools.partial(
      attention.blocked, block_q=bq, block_kv=bk, block_b=bb or None
    )
  return impls


def _timed_rounds(fns: dict, reps: int) -> dict:
  """Min seconds per entry over `reps` rounds, each round calling every fn once."""
  best = {name: float("inf") for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def attention_figures(shape, impls: dict, reps: int) -> dict:
  q, k, v, w, mask = _inputs(*shape)
  seg = mask.astype(jnp.int32)
  calls, results = {}, {}
  for name, fn in impls.items():
    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, seg) * w), (0, 1, 2)))
    results[name] = (fwd(q, k, v, seg), grad(q, k, v))
    calls[f"{name} fwd"] = functools.partial(fwd, q, k, v, seg)
    calls[f"{name} fwd+bwd"] = functools.partial(grad, q, k, v)
  times = _timed_rounds(calls, reps)
  real = np.asarray(mask)[:, :, None, None]
  ref_out, ref_grads = results["dense"]
  out = {}
  for name, (o, grads) in results.items():
    diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    out[name] = {
      "fwd_s": times[f"{name} fwd"],
      "fwd_bwd_s": times[f"{name} fwd+bwd"],
      "fwd_vs_dense": times[f"{name} fwd"] / times["dense fwd"],
      "fwd_bwd_vs_dense": times[f"{name} fwd+bwd"] / times["dense fwd+bwd"],
      "max_abs_diff_out_real": diff(np.asarray(o) * real, np.asarray(ref_out) * real),
      "max_abs_diff_grads": max(diff(g, r) for g, r in zip(grads, ref_grads, strict=True)),
    }
  return out


def model_figures(shape, impl_names, reps: int) -> dict:
  B, T, N, K, H = shape
  hidden = 64 if T > 64 else 32
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 300, (B, T)), jnp.int32)
  mask = _inputs(*shape)[-1]
  positions = positions_from_mask(mask)
  calls, grads = {}, {}
  for impl in impl_names:
    cfg = ModelConfig(
      vocab_size=300,
      hidden_size=hidden,
      intermediate_size=3 * hidden,
      num_layers=2,
      num_heads=N,
      num_kv_heads=K,
      head_dim=H,
      attention_impl=impl,
    )
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)

    def loss(params, graphdef=graphdef):
      logits = nnx.merge(graphdef, params)(tokens, positions, mask)
      logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
      picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    step = jax.jit(jax.value_and_grad(loss))
    grads[impl] = step(params)
    calls[impl] = functools.partial(step, params)
  times = _timed_rounds(calls, reps)
  leaves = {k: jax.tree.leaves(g) for k, (_, g) in grads.items()}
  return {
    impl: {
      "fwd_bwd_s": times[impl],
      "vs_dense": times[impl] / times["dense"],
      "loss_diff": abs(float(grads[impl][0]) - float(grads["dense"][0])),
      "max_abs_diff_grads": max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves[impl], leaves["dense"], strict=True)
      ),
    }
    for impl in impl_names
  }


def main(argv=None):
  a = _args(argv)
  shape = SIZES["tiny" if a.tiny else "toy"]
  B, T, N, K, H = shape
  print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s); B={B} T={T} N={N} K={K} "
        f"H={H}, float32, causal, left-padded; min of {a.reps} rounds")  # fmt: skip
  figs = {"shape": dict(B=B, T=T, N=N, K=K, H=H), "reps": a.reps}
  figs["attention"] = attention_figures(shape, _impls(a.sweep), a.reps)
  print(f"{'attention':34s} {'fwd ms':>8s} {'x dense':>8s} {'fwd+bwd ms':>11s} {'x dense':>8s} "
        f"{'|d out|':>8s} {'|d grad|':>8s}")  # fmt: skip
  for name, f in figs["attention"].items():
    print(f"{name:34s} {f['fwd_s'] * 1e3:8.1f} {f['fwd_vs_dense']:8.2f} "
          f"{f['fwd_bwd_s'] * 1e3:11.1f} {f['fwd_bwd_vs_dense']:8.2f} "
          f"{f['max_abs_diff_out_real']:8.1e} {f['max_abs_diff_grads']:8.1e}")  # fmt: skip
  if not a.skip_model:
    figs["model"] = model_figures(shape, ("dense", "blocked"), a.reps)
    print(f"{'model fwd+bwd (2 layers)':34s} {'ms':>8s} {'x dense':>8s} {'|d loss|':>9s} "
          f"{'|d grad|':>9s} {'attention share':>16s}")  # fmt: skip
    for name, f in figs["model"].items():
      # Two layers of standalone attention fwd+bwd over the model's time (an estimate).
      f["attention_share"] = 2 * figs["attention"][name]["fwd_bwd_s"] / f["fwd_bwd_s"]
      print(f"{name:34s} {f['fwd_bwd_s'] * 1e3:8.1f} {f['vs_dense']:8.2f} "
            f"{f['loss_diff']:9.1e} {f['max_abs_diff_grads']:9.1e} "
            f"{f['attention_share']:16.2f}")  # fmt: skip
  if a.out:
    with open(a.out, "w") as f:
      json.dump(figs, f, indent=2)
  return figs


if __name__ == "__main__":
  main()
