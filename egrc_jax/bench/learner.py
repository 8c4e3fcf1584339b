"""The learner step's speed: packed against padded rows, and FLOP/s against this machine's
own matmul rate, measured in the same run.

    python -m egrc_jax.bench.learner [--tiny] [--repeats 5] [--json out.json]
        [--cases toy,r1_like,r1_proportions] [--micro-batch-rows N]

Three measurements, each the best of `--repeats` timed calls after one compile:
  * matmul: a jitted 2048^3 float32 matmul (2 * 2048^3 FLOP), the machine's own rate,
    measured before, between and after the cases (shares are of the highest);
  * toy: the toy's learner step (its model: D 64, F 192, 2 layers, 4 heads, vocab 80;
    128 rollout rows = 16 prompts x 8, prompt bucket 32, L = 192, completion lengths drawn
    like the toy's stage-1 rollouts), padded and packed;
  * r1_like: a tiny model (D 64) on lengths up to L = 2048 drawn from a long tail (a
    lognormal with median 600 tokens, 8% cut at L: R1-Distill's shape on MATH), padded and
    packed;
  * r1_proportions: the same rollout on a model (D 256, F 2560, the same attention) whose
    attention-to-matmul work matches R1-Distill-1.5B's (the D 64 model's attention weighs
    40x more per token and dominates its step).
Figures: real tokens per second (prompt and completion tokens of the rollout, padding
excluded) per layout and their ratio; the rows of the batch and the rows the step computes
(its micro-batches that hold a token; fill = real tokens / computed slots); the model
FLOP/s (6 x matmul params per real token plus the causal attention scores, a forward and a
backward) and its share of the matmul rate. The compiler's own FLOP count of each step
(cost_analysis) is printed too: it counts a loop body once and both branches of the skip,
so it is no measure of the work done.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from egrc_jax import cli, losses
from egrc_jax.model import ModelConfig
from egrc_jax.sampler import Rollout
from egrc_jax.sharding import init_model
from egrc_jax.train import computed_micro_batches, init_state_sharded, make_train_step
from egrc_jax.trainer import batch as batch_lib

TOY = ModelConfig(
  vocab_size=80, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
  num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  model: ModelConfig
  prompts: int
  samples: int
  prompt_bucket: int
  max_new_tokens: int
  lengths: str  # "toy" | "r1"
  micro_batch_rows: int


CASES = {
  # The toy's micro-batches of 8 rows (configs/toy.py optim.micro_batch_rows): ~1,800
  # slots, whose activations stay in this CPU's caches.
  "toy": Case("toy", TOY, 16, 8, 32, 192, "toy", 8),
  # One row (2,176 slots) per micro-batch for the R1-like lengths: the step computes a
  # micro-batch per filled row (the batch's empty micro-batches are skipped), 29 of its 64
  # rows here (micro-batches of 4 compute 32, of 2: 30; 2026-12-07).
  "r1_like": Case("r1_like", TOY, 8, 8, 128, 2048, "r1", 1),
  # The same lengths on a model with R1-Distill's balance of attention and matmul work:
  # attention FLOPs per attended pair / matmul FLOPs per token = 2 N H / (matmul params per
  # layer) = 1/15,700 (R1-Distill-1.5B: 1/15,200; the D 64 toy model: 1/384).
  "r1_proportions": Case(
    "r1_proportions",
    TOY.replace(hidden_size=256, intermediate_size=2560),
    8,
    8,
    128,
    2048,
    "r1",
    1,
  ),  # fmt: skip
}
TINY = {
  "toy": Case("toy", TOY.replace(num_layers=1), 4, 4, 32, 64, "toy", 2),
  "r1_like": Case("r1_like", TOY.replace(num_layers=1), 2, 4, 32, 256, "r1", 4),
  "r1_proportions": Case(
    "r1_proportions",
    TOY.replace(num_layers=1, hidden_size=128, intermediate_size=1024),
    2,
    4,
    32,
    256,
    "r1",
    4,
  ),  # fmt: skip
}


def draw_lengths(kind: str, n: int, L: int, rng) -> np.ndarray:
  """Completion lengths in [1, L]: the toy's stage-1 spread (median ~ L/4), or R1's long tail."""
  if kind == "toy":
    x = rng.gamma(3.0, L / 12.0, n)
  else:
    x = rng.lognormal(np.log(600 * L / 2048), 0.9, n)
  return np.clip(np.round(x), 1, L).astype(np.int32)


def make_rollout(case: Case, seed: int = 0) -> Rollout:
  rng = np.random.default_rng(seed)
  B, Tp, C = case.prompts * case.samples, case.prompt_bucket, case.max_new_tokens
  V = case.model.vocab_size
  plen = np.repeat(rng.integers(Tp // 2, Tp + 1, case.prompts), case.samples)
  clen = draw_lengths(case.lengths, B, C, rng)
  pmask = np.arange(Tp)[None, :] >= (Tp - plen)[:, None]
  cmask = np.arange(C)[None, :] < clen[:, None]
  f = lambda: np.where(cmask, -rng.random((B, C)), 0.0).astype(np.float32)
  return Rollout(
    prompt_tokens_BTp=np.where(pmask, rng.integers(1, V, (B, Tp)), 0).astype(np.int32),
    prompt_mask_BTp=pmask,
    completion_tokens_BC=np.where(cmask, rng.integers(1, V, (B, C)), 0).astype(np.int32),
    completion_mask_BC=cmask,
    lengths_B=clen,
    truncated_B=clen == C,
    logprobs_BC=f(),
    policy_logprobs_BC=f(),
    entropy_BC=-f(),
    tempered_logprobs_BC=f(),
    tempered_entropy_BC=-f(),
    prompt_index_B=np.arange(B, dtype=np.int32) // case.samples,
    num_samples=case.samples,
  )


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_rate(repeats: int, n: int = 2048) -> float:
  """GFLOP/s of a jitted n^3 float32 matmul (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  return 2 * n**3 / _best(lambda: f(a, b), repeats) / 1e9


def model_flops(cfg: ModelConfig, rollout: Rollout) -> float:
  """Model FLOP of one forward + backward over the rollout's real tokens: 6 per matmul
  parameter per token, plus the causal attention scores and values (2 x 2 x N x H per
  attended pair, forward; x 3 with the backward) of each sequence on its own."""
  D, F, N, K = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads
  H, L, V = cfg.head_dim, cfg.num_layers, cfg.vocab_size
  per_token = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V
  n = np.asarray(rollout.prompt_mask_BTp).sum(1) + np.asarray(rollout.lengths_B)
  pairs = float(np.sum(n * (n + 1) / 2))
  return 6.0 * per_token * float(n.sum()) + 3 * 4 * L * N * H * pairs


def time_layout(case: Case, rollout: Rollout, layout: str, repeats: int) -> dict:
  model = init_model(case.model, seed=0)
  tx = optax.adamw(1e-5)
  state, _ = init_state_sharded(nnx.state(model, nnx.Param), tx, None)
  loss_cfg = losses.LossConfig(vocab_chunk=8192)
  P, G = case.prompts, case.samples
  adv = np.random.default_rng(1).normal(size=(P, G)).astype(np.float32)
  # Packed rows as the trainer builds them (with micro-batches: the rollout's rows).
  batch = batch_lib.make_batch(
    rollout,
    adv,
    np.ones((P, G), bool),
    loss_cfg,
    layout,
    rows_multiple=case.micro_batch_rows or 1,
    micro_batch_rows=case.micro_batch_rows,
  )
  batch = jax.device_put(batch)
  step = make_train_step(nnx.graphdef(model), tx, loss_cfg, micro_batch_rows=case.micro_batch_rows)
  t, lr = jnp.float32(1.0), jnp.float32(1e-5)
  compiled = step.lower(state, batch, t, lr).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  box = {"state": state}

  def call():
    box["state"], m = compiled(box["state"], batch, t, lr)
    return m["loss"]

  call()  # warm: the first call after a compile allocates
  seconds = _best(call, repeats)
  real = int(np.asarray(rollout.prompt_mask_BTp).sum() + np.asarray(rollout.lengths_B).sum())
  # Rows the step computes: its micro-batches that hold a completion token.
  b = case.micro_batch_rows or batch.tokens_BS.shape[0]
  computed = computed_micro_batches(batch, case.micro_batch_rows) * b
  return {
    "layout": layout,
    "rows": int(batch.tokens_BS.shape[0]),
    "computed_rows": computed,
    "slots": int(batch.tokens_BS.size),
    "computed_slots": computed * int(batch.tokens_BS.shape[1]),
    "real_tokens": real,
    "seconds": seconds,
    "real_tokens_per_s": real / seconds,
    "compiler_gflop": float(cost.get("flops", float("nan"))) / 1e9,
  }


def run(
  tiny: bool = False, repeats: int = 5, names: tuple = (), micro_batch_rows: int | None = None
) -> dict:
  cases = TINY if tiny else CASES
  unknown = set(names) - set(cases)
  if unknown:
    raise ValueError(f"--cases {sorted(unknown)}: use some of {sorted(cases)}")
  cases = {k: v for k, v in cases.items() if not names or k in names}
  if micro_batch_rows is not None:
    cases = {k: dataclasses.replace(v, micro_batch_rows=micro_batch_rows) for k, v in cases.items()}
  # The matmul rate is measured before, between and after the cases (a shared 2-core VM's
  # rate moves by up to 2x within minutes); shares are taken against the highest.
  rates = [matmul_rate(repeats)]
  out = {"cases": {}}
  for name, case in cases.items():
    if out["cases"]:
      rates.append(matmul_rate(repeats))
    rollout = make_rollout(case)
    padded = time_layout(case, rollout, "padded", repeats)
    packed = time_layout(case, rollout, "packed", repeats)
    flops = model_flops(case.model, rollout)
    out["cases"][name] = {
      "padded": padded,
      "packed": packed,
      "packed_over_padded": packed["real_tokens_per_s"] / padded["real_tokens_per_s"],
      "model_gflop": flops / 1e9,
      **{
        f"{k}_gflop_s": flops / v["seconds"] / 1e9
        for k, v in (("padded", padded), ("packed", packed))
      },  # fmt: skip
    }
  rates.append(matmul_rate(repeats))
  out["matmul_gflop_s"], out["matmul_gflop_s_all"] = max(rates), rates
  for c in out["cases"].values():
    for k in ("padded", "packed"):
      c[f"{k}_share_of_matmul"] = c[f"{k}_gflop_s"] / out["matmul_gflop_s"]
  return out


def table(r: dict) -> str:
  every = ", ".join(f"{x:.0f}" for x in r["matmul_gflop_s_all"])
  lines = [f"matmul (2048^3 float32, jitted): {r['matmul_gflop_s']:.1f} GFLOP/s, the highest "
           f"of the run's measurements ({every})"]  # fmt: skip
  for name, c in r["cases"].items():
    lines.append(f"\n{name}: model {c['model_gflop']:.2f} GFLOP per step (real tokens)")
    lines.append(f"  {'layout':7} {'rows':>5} {'computed':>9} {'fill':>6} {'s/step':>8} "
                 f"{'real tok/s':>11} {'model GFLOP/s':>14} {'of matmul':>10} "
                 f"{'compiler GFLOP':>15}")  # fmt: skip
    for k in ("padded", "packed"):
      v = c[k]
      lines.append(
        f"  {k:7} {v['rows']:5d} {v['computed_rows']:9d} "
        f"{v['real_tokens'] / v['computed_slots']:6.2f} {v['seconds']:8.3f} "
        f"{v['real_tokens_per_s']:11.0f} {c[k + '_gflop_s']:14.1f} "
        f"{c[k + '_share_of_matmul']:10.1%} {v['compiler_gflop']:15.2f}"
      )
    lines.append(f"  packed / padded (real tokens per second): {c['packed_over_padded']:.2f}x")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = cli.Parser(prog="python -m egrc_jax.bench.learner", description=__doc__)
  p.add_argument("--tiny", action="store_true", help="small shapes (seconds; the test suite)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="", help="also write the figures here")
  p.add_argument("--cases", default="", help="comma-separated cases to run (default: all)")
  p.add_argument(
    "--micro-batch-rows",
    type=int,
    default=None,
    help="learner rows per micro-batch for every case (0: one micro-batch of every row)",
  )
  a = p.parse_args(argv)
  if a.repeats < 1:
    raise ValueError(f"--repeats={a.repeats} must be >= 1")
  if a.micro_batch_rows is not None and a.micro_batch_rows < 0:
    raise ValueError(f"--micro-batch-rows={a.micro_batch_rows} must be >= 0")
  names = tuple(x for x in a.cases.split(",") if x)
  r = run(a.tiny, a.repeats, names, a.micro_batch_rows)
  print(table(r), flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(r, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
