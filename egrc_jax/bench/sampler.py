"""Sampler throughput: egrc_jax.sampler vs transformers `generate` on the same weights (CPU).

  python -m egrc_jax.bench.sampler --out /tmp/bench_sampler.json      # default 56M Qwen2
  python -m egrc_jax.bench.sampler --small                            # a ~30 s check

Both sides get the same random Qwen2-shaped weights, the same prompts (random ids, all of
`--prompt-len` tokens) and generate exactly `--new-tokens` tokens per row (no stop token):
greedy, and sampled (temperature, top-p). Batches: one prompt (batch 1), and P prompts x G
samples (batch P*G = 64 by default; ours prefills P prompts once and repeats the cache,
transformers is given the P*G rows). Figures: prefill and decode tokens/s, compile time,
KV-cache bytes, peak RSS; batch-1 decode against the memory-bandwidth bound (bytes of every
weight but the input embedding per token, over a matrix-vector product's read rate measured
in the same run) and grouped decode against the matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from egrc_jax import cli
from egrc_jax.hf import config_from_hf, model_from_state_dict
from egrc_jax.sampler import SamplingConfig, decode_loop, prefill, prepare_prompts

RESULT_KEYS = ("config", "machine", "bounds", "ours", "transformers", "ratios", "peak_rss_bytes")
SIZES = {
  # name: (hidden, layers, heads, kv_heads, intermediate, vocab, prompt_len, new_tokens,
  #        prompts P, samples G, matmul n)
  "default": (512, 8, 8, 4, 1408, 32000, 128, 128, 8, 8, 2048),
  "small": (256, 4, 4, 2, 704, 8000, 64, 64, 8, 8, 1024),
  "tiny": (32, 2, 4, 2, 64, 128, 8, 4, 2, 2, 128),
}


def _args(argv):
  p = cli.Parser(prog="python -m egrc_jax.bench.sampler", description=__doc__)
  size = p.add_mutually_exclusive_group()
  size.add_argument("--small", action="store_true", help="a smaller model, ~30 s")
  size.add_argument("--tiny", action="store_true", help="seconds; for the test suite")
  for name in (
    "hidden",
    "layers",
    "heads",
    "kv-heads",
    "intermediate",
    "vocab",
    "prompt-len",
    "new-tokens",
    "prompts",
    "samples",
  ):
    p.add_argument(f"--{name}", type=int, default=None, help="override the size preset")
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--skip-hf", action="store_true", help="time only our sampler")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  a = p.parse_args(argv)
  preset = SIZES["small" if a.small else "tiny" if a.tiny else "default"]
  keys = (
    "hidden",
    "layers",
    "heads",
    "kv_heads",
    "intermediate",
    "vocab",
    "prompt_len",
    "new_tokens",
    "prompts",
    "samples",
    "matmul_n",
  )
  for k, v in zip(keys, preset, strict=True):
    if getattr(a, k, None) is None:
      setattr(a, k, v)
  return a


def _hf_config(a):
  from transformers import Qwen2Config

  return Qwen2Config(
    vocab_size=a.vocab,
    hidden_size=a.hidden,
    intermediate_size=a.intermediate,
    num_hidden_layers=a.layers,
    num_attention_heads=a.heads,
    num_key_value_heads=a.kv_heads,
    max_position_embeddings=max(4096, a.prompt_len + a.new_tokens),
    tie_word_embeddings=False,
  )


def _best(fn, reps: int) -> float:
  """Min wall seconds of `reps` calls of fn (which blocks on its result)."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def machine_bounds(weight_count: int, matmul_n: int) -> dict:
  """Read bandwidth (a jitted matvec over a [R, 512] f32 matrix of `weight_count` elements)
  and f32 matmul FLOP/s ([n, n] @ [n, n]) on this machine, now."""
  cols = 512
  rows = max(weight_count // cols, 1)
  w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
  x = jnp.ones((cols,), jnp.float32)
  matvec = jax.jit(lambda w, x: w @ x)
  matvec(w, x).block_until_ready()
  t_mv = _best(lambda: matvec(w, x).block_until_ready(), 10)
  a = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  t_mm = _best(lambda: matmul(a).block_until_ready(), 5)
  return {
    "read_bandwidth_bytes_s": rows * cols * 4 / t_mv,
    "matmul_flop_s": 2 * matmul_n**3 / t_mm,
    "matmul_n": matmul_n,
    "matvec_bytes": rows * cols * 4,
  }


def time_ours(graphdef, state, prompts, cfg: SamplingConfig, G: int, vocab: int) -> dict:
  tokens, mask, lengths = prepare_prompts(prompts, cfg, vocab)
  Pn, Tp = tokens.shape
  B, C = Pn * G, cfg.max_new_tokens
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  rep = lambda x: jnp.asarray(np.repeat(x, G, axis=0))
  len_B, ids_B = rep(lengths), rep(np.arange(Pn, dtype=np.int32))

  def run():
    t0 = time.perf_counter()
    last, cache = prefill(graphdef, state, tokens, mask, num_samples=G, cache_size=Tp + C)
    jax.block_until_ready((last, cache))
    t1 = time.perf_counter()
    nbytes = cache.nbytes()
    bufs, lengths_B, _, _ = decode_loop(
      graphdef, state, cache, last, len_B, ids_B, jnp.uint32(0), cfg=cfg, num_samples=G
    )
    jax.block_until_ready(bufs)
    t2 = time.perf_counter()
    assert int(jnp.min(lengths_B)) == C  # no stop tokens: every row ran the whole budget
    return t1 - t0, t2 - t1, nbytes

  # Compile time: trace + lower + XLA compile of both functions, timed ahead of the runs.
  t = time.perf_counter()
  prefill.lower(graphdef, state, tokens, mask, num_samples=G, cache_size=Tp + C).compile()
  compile_s = time.perf_counter() - t
  last, cache = prefill(graphdef, state, tokens, mask, num_samples=G, cache_size=Tp + C)
  t = time.perf_counter()
  decode_loop.lower(
    graphdef, state, cache, last, len_B, ids_B, jnp.uint32(0), cfg=cfg, num_samples=G
  ).compile()
  compile_s += time.perf_counter() - t
  del last, cache
  _, _, nbytes = run()  # warm-up (fills the jit caches)
  prefill_s, decode_s = float("inf"), float("inf")
  for _ in range(2 if C * B <= 4096 else 1):
    p, d, _ = run()
    prefill_s, decode_s = min(prefill_s, p), min(decode_s, d)
  return {
    "batch": B,
    "prefill_s": prefill_s,
    "prefill_tok_s": Pn * Tp / prefill_s,
    "decode_s": decode_s,
    "decode_tok_s": B * C / decode_s,
    "end_to_end_tok_s": B * C / (prefill_s + decode_s),
    "compile_s": compile_s,
    "kv_cache_bytes": nbytes,
  }


def time_hf(tm, prompts, G: int, C: int, greedy: bool, a) -> dict:
  import torch

  ids = torch.tensor(np.repeat(np.asarray(prompts), G, axis=0))
  attn = torch.ones_like(ids)
  kw = (
    dict(do_sample=False)
    if greedy
    else dict(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=0)
  )
  gen = lambda n: tm.generate(
    input_ids=ids,
    attention_mask=attn,
    max_new_tokens=n,
    min_new_tokens=n,
    eos_token_id=None,
    pad_token_id=0,
    **kw,
  )
  with torch.no_grad():
    gen(2)  # warm-up
    t = time.perf_counter()
    out = gen(C)
    total = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + C
    prefill_s = _best(lambda: tm(input_ids=ids, attention_mask=attn), 1)
  B = ids.shape[0]
  return {
    "batch": B,
    "total_s": total,
    "end_to_end_tok_s": B * C / total,
    "prefill_tok_s": ids.numel() / prefill_s,
    "decode_tok_s": B * C / max(total - prefill_s, 1e-9),
  }


def run(a) -> dict:
  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  tm = AutoModelForCausalLM.from_config(_hf_config(a)).eval()
  tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  mcfg = config_from_hf(tm.config.to_dict(), param_dtype="float32")
  graphdef, state = nnx.split(model_from_state_dict(mcfg, tensors))
  n_params = mcfg.num_params()
  weight_count = n_params - mcfg.vocab_size * mcfg.hidden_size  # all but the input embedding
  bounds = machine_bounds(weight_count, a.matmul_n)
  bounds["weight_bytes_per_token"] = weight_count * 4
  bounds["batch1_bound_tok_s"] = bounds["read_bandwidth_bytes_s"] / (weight_count * 4)
  S_mean = a.prompt_len + a.new_tokens / 2
  attn_flops = 4 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * S_mean
  bounds["decode_flops_per_token"] = 2 * weight_count + attn_flops

  rng = np.random.default_rng(0)
  prompts = rng.integers(0, a.vocab, (a.prompts, a.prompt_len)).tolist()
  base = dict(max_new_tokens=a.new_tokens, prompt_buckets=(a.prompt_len,))
  modes = {
    "greedy": SamplingConfig(greedy=True, **base),
    "sampled": SamplingConfig(temperature=a.temperature, top_p=a.top_p, **base),
  }
  batches = {"batch_1": (prompts[:1], 1), "grouped": (prompts, a.samples)}
  ours, hf = {}, {}
  for mode, cfg in modes.items():
    ours[mode], hf[mode] = {}, {}
    for name, (ps, G) in batches.items():
      ours[mode][name] = time_ours(graphdef, state, ps, cfg, G, a.vocab)
      _log(f"ours {mode} {name}: {ours[mode][name]}")
      if not a.skip_hf:
        hf[mode][name] = time_hf(tm, ps, G, a.new_tokens, mode == "greedy", a)
        _log(f"transformers {mode} {name}: {hf[mode][name]}")

  ratios = {}
  for mode in modes:
    for name in batches:
      if not a.skip_hf:
        for k in ("end_to_end_tok_s", "decode_tok_s", "prefill_tok_s"):
          ratios[f"{mode}_{name}_{k}_vs_hf"] = ours[mode][name][k] / hf[mode][name][k]
    ratios[f"{mode}_batch_1_decode_vs_bandwidth_bound"] = (
      ours[mode]["batch_1"]["decode_tok_s"] / bounds["batch1_bound_tok_s"]
    )
    ratios[f"{mode}_grouped_decode_flops_fraction"] = (
      ours[mode]["grouped"]["decode_tok_s"]
      * bounds["decode_flops_per_token"]
      / bounds["matmul_flop_s"]
    )
  return {
    "config": {k: v for k, v in vars(a).items() if k != "out"} | {"params": n_params},
    "machine": {
      "cpus": os.cpu_count(),
      "jax": jax.__version__,
      "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "device": str(jax.devices()[0]),
    },
    "bounds": bounds,
    "ours": ours,
    "transformers": hf,
    "ratios": ratios,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def table(r: dict) -> str:
  lines = [f"model: {r['config']['params'] / 1e6:.1f}M params; machine: {r['machine']}"]
  b = r["bounds"]
  lines.append(
    f"read bandwidth {b['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s -> batch-1 bound "
    f"{b['batch1_bound_tok_s']:.0f} tok/s; matmul {b['matmul_flop_s'] / 1e9:.0f} GFLOP/s"
  )
  head = f"{'mode':8} {'batch':8} {'side':13} {'prefill tok/s':>14} {'decode tok/s':>13} "
  lines.append(head + f"{'e2e tok/s':>10} {'compile s':>10} {'KV MiB':>8}")
  for mode, per in r["ours"].items():
    for name, o in per.items():
      lines.append(
        f"{mode:8} {o['batch']:<8} {'egrc_jax':13} {o['prefill_tok_s']:14.0f} "
        f"{o['decode_tok_s']:13.1f} {o['end_to_end_tok_s']:10.1f} {o['compile_s']:10.1f} "
        f"{o['kv_cache_bytes'] / 2**20:8.1f}"
      )
      h = r["transformers"].get(mode, {}).get(name)
      if h:
        lines.append(
          f"{mode:8} {h['batch']:<8} {'transformers':13} {h['prefill_tok_s']:14.0f} "
          f"{h['decode_tok_s']:13.1f} {h['end_to_end_tok_s']:10.1f}"
        )
  lines += [f"{k}: {v:.2f}" for k, v in r["ratios"].items()]
  lines.append(f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
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
  sys.exit(cli.run(main))
