"""Prompts as token ids: the model's chat template around the problem plus the instruction.

The user message is `problem + "\\n" + instruction` (instruction omitted when empty), with an
optional system message, rendered by the tokenizer's own chat template with
`add_generation_prompt=True` (so the prompt ends where the assistant's reply starts, e.g.
"<｜Assistant｜><think>\\n" for R1-Distill), then encoded without adding special tokens
again (templates already write BOS into the text).

Fallback, for tokenizers without a chat template (the toy task's, plain base models):
  "[System: <system>\\n]User: <problem>\\n<instruction>\\nAssistant:"
encoded with the tokenizer's special tokens (so a BOS is added when the tokenizer adds one).
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

FALLBACK_TEMPLATE = "User: {user}\nAssistant:"


def user_message(problem: str, instruction: str = INSTRUCTION) -> str:
  """The user turn: the problem, then the instruction on its own line."""
  return f"{problem}\n{instruction}" if instruction else problem


def chat_messages(problem: str, instruction: str = INSTRUCTION, system_prompt: str = ""):
  """[{"role", "content"}] messages for `apply_chat_template`."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user", "content": user_message(problem, instruction)})
  return messages


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(
  tokenizer, problem: str, instruction: str = INSTRUCTION, system_prompt: str = ""
) -> str:
  """The prompt text: chat template with the generation prompt, or the plain fallback."""
  if has_chat_template(tokenizer):
    return tokenizer.apply_chat_template(
      chat_messages(problem, instruction, system_prompt),
      tokenize=False,
      add_generation_prompt=True,
    )
  text = FALLBACK_TEMPLATE.format(user=user_message(problem, instruction))
  return f"System: {system_prompt}\n{text}" if system_prompt else text


def opens_think(tokenizer) -> bool:
  """Whether the chat template's generation prompt leaves a `<think>` block open.

  R1-Distill's template ends the prompt with "<｜Assistant｜><think>\\n", so its responses
  start inside the reasoning and never write `<think>` themselves; the grader must then read a
  response without `</think>` as cut off (no answer part). Qwen3's default template does not
  open the block (the model writes `<think>`), and with enable_thinking=False it writes an
  empty, closed one. Decided by rendering a one-message prompt with add_generation_prompt=True
  and checking that its last `<think>` comes after its last `</think>`. The plain fallback
  template ("...Assistant:") opens nothing.
  """
  if not has_chat_template(tokenizer):
    return False
  text = tokenizer.apply_chat_template(
    chat_messages("1 + 1 = ?", instruction=""), tokenize=False, add_generation_prompt=True
  )
  return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)


def encode_prompt(
  tokenizer, problem: str, instruction: str = INSTRUCTION, system_prompt: str = ""
) -> list[int]:
  """Token ids of `render_prompt` (special tokens added only for the fallback template)."""
  text = render_prompt(tokenizer, problem, instruction, system_prompt)
  return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def load_tokenizer(path):
  """The tokenizer saved in `path`, exactly as its tokenizer.json defines it.

  `AutoTokenizer` picks the tokenizer class from a model directory's config.json
  (model_type "qwen2" -> Qwen2Tokenizer), which rebuilds the pre-tokenizer and decoder for
  Qwen's byte-level BPE and so breaks any other tokenizer saved next to a Qwen2-family model
  (the toy task's word-level one decodes without spaces). `PreTrainedTokenizerFast` reads
  tokenizer.json as written; directories without one fall back to `AutoTokenizer`.
  """
  import os

  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  path = str(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return PreTrainedTokenizerFast.from_pretrained(path)
  return AutoTokenizer.from_pretrained(path)


def stop_ids(tokenizer, model_cfg) -> tuple[int, ...]:
  """Token ids that end a response: the model config's eos ids and the tokenizer's eos."""
  ids = set(model_cfg.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  if not ids:
    raise ValueError("neither the model config nor the tokenizer names an eos token to stop on")
  return tuple(sorted(ids))


def pad_id(tokenizer) -> int:
  """The tokenizer's pad token, else its eos token, else 0 (pads are masked out anyway)."""
  for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if v is not None:
      return int(v)
  return 0
