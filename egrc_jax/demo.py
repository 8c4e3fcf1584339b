"""End-to-end smoke demo on CPU: HF model -> egrc_jax -> greedy decode -> HF model again.

  python -m egrc_jax.demo

Builds a tiny random Qwen2 with `transformers` in a temp dir (nothing downloaded), imports
it with `egrc_jax.hf.load_model`, greedily decodes a few tokens from a left-padded batch
through `Transformer.decode` and its KV cache, compares them with transformers' own greedy
`generate`, exports the model back to HF format, reloads it with `AutoModelForCausalLM`
and checks its logits against ours. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
import tempfile  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from egrc_jax import cli
from egrc_jax.hf import export_model, load_model  # noqa: E402
from egrc_jax.model import KVCache, positions_from_mask  # noqa: E402

# float32 on both sides; differences are summation-order rounding only.
LOGIT_TOL = 1e-4


def _tiny_qwen2(path: str) -> None:
  import torch
  from transformers import AutoModelForCausalLM, Qwen2Config

  torch.manual_seed(0)
  hf_cfg = Qwen2Config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    eos_token_id=0,
  )
  model = AutoModelForCausalLM.from_config(hf_cfg)
  with torch.no_grad():  # HF initialises biases to zero; make every weight matter
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)


def greedy(model, tokens_BT: np.ndarray, mask_BT: np.ndarray, steps: int) -> np.ndarray:
  """Prefill the (left-padded) prompt, then `steps` greedy tokens, one decode call each."""
  B, T = tokens_BT.shape
  cache = KVCache.zeros(model.cfg, B, T + steps)
  mask = jnp.asarray(mask_BT)
  positions = positions_from_mask(mask)
  logits, cache = model.decode(jnp.asarray(tokens_BT), positions, mask, cache)
  next_B, out = jnp.argmax(logits[:, -1], axis=-1), []
  position_B = positions[:, -1]
  for _ in range(steps):
    out.append(next_B)
    position_B = position_B + 1
    logits, cache = model.decode(
      next_B[:, None], position_B[:, None], jnp.ones((B, 1), bool), cache
    )
    next_B = jnp.argmax(logits[:, -1], axis=-1)
  return np.asarray(jnp.stack(out, axis=1))


def main(argv: list[str] | None = None) -> int:
  cli.Parser(prog="python -m egrc_jax.demo", description=__doc__).parse_args(argv)
  import torch
  from transformers import AutoModelForCausalLM

  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "export")
    _tiny_qwen2(hf_dir)
    cfg, model = load_model(hf_dir)
    print(f"imported {cfg.model_type}: {cfg.num_params():,} params from {hf_dir}")

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (2, 6))
    mask = np.ones((2, 6), bool)
    mask[1, :2] = False  # row 1 is a 4-token prompt, left-padded
    new = greedy(model, tokens, mask, steps=5)
    print("egrc_jax greedy tokens:    ", new.tolist())

    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
      hf_out = ref.generate(
        torch.tensor(tokens),
        attention_mask=torch.tensor(mask.astype(np.int64)),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
      )
    hf_new = hf_out[:, tokens.shape[1] :].numpy()
    print("transformers greedy tokens:", hf_new.tolist())

    export_model(model, out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
    with torch.no_grad():
      theirs = reloaded(
        input_ids=torch.tensor(tokens),
        attention_mask=torch.tensor(mask.astype(np.int64)),
        position_ids=torch.tensor(positions),
      ).logits.numpy()
    diff = float(np.abs(ours - theirs)[mask].max())
    print(f"exported to {out_dir}: max |logit diff| vs transformers reload = {diff:.2e}")
  ok = diff < LOGIT_TOL and np.array_equal(new, hf_new)
  print("OK: logits and greedy tokens match" if ok else "MISMATCH")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(cli.run(main))
