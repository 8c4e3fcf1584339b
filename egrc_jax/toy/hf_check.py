"""Does the exported model behave in `transformers` exactly as in our sampler?

For a few prompts, greedy decoding twice: `transformers.AutoModelForCausalLM` on the exported
Hugging Face directory (tokenizer through `egrc_jax.data.chat.load_tokenizer`, which reads
tokenizer.json as written; `AutoTokenizer` would swap in Qwen2's byte-level decoder next to a
qwen2 config.json), and `egrc_jax.sampler.generate` on our params. Recorded per prompt: both
token lists, whether they match, both decoded texts, and the largest |logit difference| of
the two frameworks on the prompt followed by our completion (teacher forced).

Shape letters: T sequence length (prompt + completion), V vocab.
"""

from __future__ import annotations

import pathlib

import numpy as np

from egrc_jax.data.chat import load_tokenizer
from egrc_jax.model import Transformer, positions_from_mask
from egrc_jax.sampler import completion_lists, generate
from egrc_jax.toy import tokenizer as tok_lib
from egrc_jax.toy.evaluate import sampling_config


def _cut_after_stop(ids: list[int], stop: int) -> list[int]:
  return ids[: ids.index(stop) + 1] if stop in ids else ids


def check_export(
  hf_dir, model: Transformer, problem_texts: list[str], max_new_tokens: int
) -> dict:  # fmt: skip
  """Greedy tokens of `transformers` (on hf_dir) vs our sampler (on `model`), per prompt."""
  import torch
  from transformers import AutoModelForCausalLM, GenerationConfig

  hf_dir = pathlib.Path(hf_dir)
  tokenizer = load_tokenizer(hf_dir)
  torch_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  gen_cfg = GenerationConfig(
    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
  )
  prompts = [tok_lib.encode_prompt(tokenizer, t) for t in problem_texts]
  ours_all = completion_lists(
    generate(model, prompts, sampling_config(tokenizer, 0.0, max_new_tokens), seed=0)
  )
  records = []
  for text, prompt, ours in zip(problem_texts, prompts, ours_all, strict=True):
    with torch.no_grad():
      out = torch_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=gen_cfg,
      )  # fmt: skip
      theirs = _cut_after_stop(out[0, len(prompt) :].tolist(), eos)
      full = prompt + ours
      logits_torch_TV = torch_model(input_ids=torch.tensor([full])).logits[0].numpy()
    tokens_1T = np.asarray([full], np.int32)
    mask_1T = np.ones_like(tokens_1T, bool)
    logits_ours_TV = np.asarray(model(tokens_1T, positions_from_mask(mask_1T), mask_1T))[0]
    V = logits_torch_TV.shape[-1]  # transformers may pad the vocab differently: compare ours
    diff = float(np.max(np.abs(logits_ours_TV[:, :V] - logits_torch_TV)))
    records.append(
      {
        "problem": text,
        "match": ours == theirs,
        "tokens_ours": ours,
        "tokens_transformers": theirs,
        "text_ours": tokenizer.decode(ours, skip_special_tokens=True),
        "text_transformers": tokenizer.decode(theirs, skip_special_tokens=True),
        "max_abs_logit_diff": diff,
      }
    )
  return {
    "hf_dir": str(hf_dir),
    "num_prompts": len(records),
    "all_match": all(r["match"] for r in records),
    "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in records),
    "records": records,
  }
