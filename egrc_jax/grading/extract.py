"""Final-answer extraction from a model response: the `</think>` split and the last boxed answer.

Pure string scanning (no regex backtracking over the response, no evaluation), so it is safe and
linear-time on hostile text. A response is untrusted: bytes are decoded with errors="replace"
and lone surrogates are replaced, so everything downstream sees valid UTF-8 text.
"""

from __future__ import annotations

import re

from egrc_jax.data.chat import THINK_CLOSE, THINK_OPEN

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Text allowed between two boxes that still form one multi-part answer: "\boxed{1}, \boxed{2}",
# "$\boxed{1}$ \text{ and } $\boxed{2}$". Anything longer: an earlier box was an intermediate.
_JOINERS = frozenset(" \t\n,;$.\\quadandor")
_MAX_JOIN_GAP = 16
_TEXT_IN_GAP = re.compile(r"\\(?:text|mbox|mathrm)\s*\{([^{}]*)\}")


def to_text(response: str | bytes) -> str:
  """Valid UTF-8 text from untrusted model output (bytes or str with lone surrogates)."""
  if isinstance(response, bytes | bytearray):
    return bytes(response).decode("utf-8", errors="replace")
  # Lone surrogates (e.g. from surrogateescape decoding) become U+FFFD, like invalid bytes do.
  return response.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def split_reasoning(response: str, think_open: bool = False) -> tuple[str, str | None]:
  """(reasoning, answer part) of an R1-style response.

  After the last `</think>` is the answer part. A response inside a think block that never
  closes it was cut off mid-reasoning (or stopped there): it has no answer part (None). The
  block is open when the response writes `<think>` itself, or when `think_open` says the
  prompt already did: R1-Distill's generation prompt ends with "<think>\\n", so its responses
  never contain `<think>` (`egrc_jax.data.chat.opens_think(tokenizer)` tells). Otherwise a
  response without think tags is all answer part.
  """
  end = response.rfind(THINK_CLOSE)
  if end >= 0:
    return response[:end], response[end + len(THINK_CLOSE) :]
  if think_open or THINK_OPEN in response:
    return response, None
  return "", response


def _matching_braces(text: str) -> dict[int, int]:
  """Position of each "{" -> position of its "}"; unmatched "{" are absent. One stack pass."""
  match, stack = {}, []
  for i, ch in enumerate(text):
    if ch == "{":
      stack.append(i)
    elif ch == "}" and stack:
      match[stack.pop()] = i
  return match


def _box_spans(text: str) -> list[tuple[int, int, str | None]]:
  """(start, end, content) of every top-level box, left to right; content None: never closed.

  A box is `\\boxed{...}`/`\\fbox{...}` (braces balanced) or the brace-less `\\boxed 5`
  (the argument runs to the next whitespace or `$`). An unclosed box does not hide the boxes
  after it. Linear time: braces are matched once, and each command's next position is found
  once per occurrence.
  """
  if not any(c in text for c in _BOX_COMMANDS):
    return []
  match = _matching_braces(text)
  spans: list[tuple[int, int, str | None]] = []
  nxt = {c: text.find(c) for c in _BOX_COMMANDS}  # next occurrence of each command, or -1
  i = 0
  while True:
    for c in _BOX_COMMANDS:
      if 0 <= nxt[c] < i:
        nxt[c] = text.find(c, i)
    found = [(p, c) for c, p in nxt.items() if p >= 0]
    if not found:
      return spans
    start, cmd = min(found)
    j = start + len(cmd)
    while j < len(text) and text[j] == " ":
      j += 1
    if j < len(text) and text[j] == "{":
      k = match.get(j)
      if k is None:
        spans.append((start, j + 1, None))  # unclosed: scan on inside it
        i = j + 1
      else:
        spans.append((start, k + 1, text[j + 1 : k]))
        i = k + 1
    elif j > start + len(cmd) and j < len(text) and not text[j].isspace() and text[j] != "$":
      k = j  # "\boxed 5": up to the next whitespace or "$"
      while k < len(text) and not text[k].isspace() and text[k] != "$":
        k += 1
      spans.append((start, k, text[j:k]))
      i = k
    else:
      i = start + len(cmd)  # "\boxedx", "\boxed" at the end: not a box


def boxed_answer(text: str) -> str | None:
  """The last box's answer; trailing boxes joined only by commas/"and"/`$` are one answer.

  "\\boxed{1} and \\boxed{-2}" -> "1, -2"; "\\boxed{3} then \\boxed 5" -> "5". The final
  answer is the last box: an unclosed last box (`\\boxed{\\frac{1}{2}` cut off) is no answer
  (None), while an unclosed earlier box is skipped.
  """
  spans = _box_spans(text)
  if not spans or spans[-1][2] is None:
    return None
  group = [spans[-1]]
  for prev in reversed(spans[:-1]):
    gap = _TEXT_IN_GAP.sub(r"\1", text[prev[1] : group[0][0]])
    if prev[2] is None or len(gap) > _MAX_JOIN_GAP or not set(gap) <= _JOINERS:
      break
    group.insert(0, prev)
  parts = [c.strip() for _, _, c in group if c is not None and c.strip()]
  return ", ".join(parts) if parts else None


def extract_answer(response: str | bytes | None, think_open: bool = False) -> str | None:
  """The final answer of a model response: the last boxed answer after `</think>`, or None.

  `think_open`: the prompt ended inside a think block (`chat.opens_think(tokenizer)`), so a
  response without `</think>` has no answer part (see `split_reasoning`).
  """
  if response is None:
    return None
  _, answer_part = split_reasoning(to_text(response), think_open)
  if answer_part is None:
    return None
  return boxed_answer(answer_part)
