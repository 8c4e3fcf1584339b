"""A ~90-token tokenizer for the toy task, saved in Hugging Face format.

Built with the `tokenizers` library as a WordPiece model over whitespace-split words with a
fixed vocabulary, so that numbers are digit by digit: a word-initial digit is "1", a
continuing one "##2" ("12" -> ["1", "##2"], "\\boxed{32}" -> ["\\boxed{", "##3", "##2", "##}"]).
The WordPiece decoder glues "##" pieces back on, so decode(encode(text)) == text for any text
whose words are separated by single spaces (the form the task writes).

Connector words ("wait", "so", "therefore", ...) are whole-word tokens, so a connector is
exactly one sampling decision, as in the real models' vocabularies.

Saved with `transformers.PreTrainedTokenizerFast.save_pretrained`, with an R1-shaped chat
template (the generation prompt ends with "<think>"), so the trainer loads it through the same
`egrc_jax.data.chat.load_tokenizer(dir)` path as a real model's tokenizer.
"""

from __future__ import annotations

import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL = (PAD, BOS, EOS, UNK)  # ids 0..3; dropped by decode(skip_special_tokens=True)
# Structural markers: added tokens that are kept in decoded text (answer extraction needs
# "</think>"), like R1's <think> tokens.
MARKERS = ("<user>", "<assistant>", "<think>", "</think>")

WORDS = (
  # problem statement and steps
  "start", "add", "minus", "times", "+", "-", "*", "=", ",", ".", ":", "?",
  "\\boxed{",
  # connectors and filler of the verbose chains of thought
  "wait", "hmm", "so", "therefore", "alternatively", "let", "but", "okay",
  "me", "verify", "check", "double", "that", "again", "yes", "is", "right", "correct",
  "the", "value", "final", "answer", "and", "it", "checks", "out", "wrong", "not",
  "work", "through", "this", "step", "by",
)  # fmt: skip
DIGITS = tuple(str(d) for d in range(10))
CONTINUATIONS = tuple("##" + s for s in (*DIGITS, "}", "-"))

CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
  "{% elif message['role'] == 'assistant' %}<assistant> <think> {{ message['content'] }}"
  "{{ eos_token }}{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}<assistant> <think>{% endif %}"
)


def vocab() -> dict[str, int]:
  """token -> id: special tokens, markers, words, digits, continuation pieces."""
  tokens = (*SPECIAL, *MARKERS, *WORDS, *DIGITS, *CONTINUATIONS)
  if len(set(tokens)) != len(tokens):
    raise AssertionError("duplicate token in the toy vocabulary")
  return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(out_dir: str | pathlib.Path | None = None) -> PreTrainedTokenizerFast:
  """The toy tokenizer; saved to `out_dir` (tokenizer.json, tokenizer_config.json, ...) when
  given, so `load_tokenizer(out_dir)` returns an equivalent tokenizer."""
  tok = Tokenizer(models.WordPiece(vocab(), unk_token=UNK, continuing_subword_prefix="##"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=BOS,
    eos_token=EOS,
    pad_token=PAD,
    unk_token=UNK,
    clean_up_tokenization_spaces=False,
    padding_side="left",
    model_max_length=1024,
  )
  fast.chat_template = CHAT_TEMPLATE
  if out_dir is not None:
    fast.save_pretrained(str(out_dir))
  return fast


def model_vocab_size(tokenizer: PreTrainedTokenizerFast, multiple: int = 8) -> int:
  """len(tokenizer) rounded up to a multiple (the model's embedding rows)."""
  return -(-len(tokenizer) // multiple) * multiple


def encode_prompt(tokenizer: PreTrainedTokenizerFast, problem_text: str) -> list[int]:
  """Token ids of the chat-templated prompt, ending with "<assistant> <think>"."""
  text = tokenizer.apply_chat_template(
    [{"role": "user", "content": problem_text}], add_generation_prompt=True, tokenize=False
  )
  return tokenizer.encode(text, add_special_tokens=False)


def encode_response(tokenizer: PreTrainedTokenizerFast, response_text: str) -> list[int]:
  """Token ids of a response (the text after "<think>"), closed by <eos>."""
  return tokenizer.encode(response_text, add_special_tokens=False) + [tokenizer.eos_token_id]
