"""A tiny random Qwen2 model and a byte-level tokenizer with a chat template, saved as a Hugging
Face directory (save_pretrained): shared by tests/test_evaluate.py and tests/test_analysis.py.
Nothing is downloaded."""

from __future__ import annotations

import pathlib

CHAT_TEMPLATE = (
  "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"]


def byte_tokenizer():
  """260 tokens: the 256 byte symbols, then the specials (any text round-trips)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(SPECIALS)
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", chat_template=CHAT_TEMPLATE
  )


def save_tiny_model(path: str | pathlib.Path, seed: int = 0, scale: float = 0.5) -> str:
  """A 2-layer Qwen2 (hidden 32, vocab 264) with the byte tokenizer, saved to `path`.

  Weights are perturbed by `scale` * N(0, 1) so that logits are far from ties (greedy parity
  with transformers is then exact) and the eos token is sampled now and then.
  """
  import torch
  from transformers import AutoModelForCausalLM, Qwen2Config

  tokenizer = byte_tokenizer()
  eos = tokenizer.eos_token_id
  cfg = Qwen2Config(
    vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
    pad_token_id=tokenizer.pad_token_id,
  )  # fmt: skip
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  path = pathlib.Path(path)
  model.save_pretrained(path, safe_serialization=True)
  tokenizer.save_pretrained(path)
  return str(path)
