"""Final-answer extraction from a model response: the `</think>` split and the last boxed answer.

Pure string scanning (no regex backtracking over the response, no evaluation), so it is safe and
linear-time on hostile text. A response is untrusted: bytes are decoded with errors="replace"
and lone surrogates are replaced, so everything downstream sees valid UTF-8 text.
"""

from __future__ import annotations

import re

from egrc_jax.data.gold import last_boxed_content

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
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


def split_reasoning(response: str) -> tuple[str, str | None]:
  """(reasoning, answer part) of an R1-style response.

  After the last `</think>` is the answer part. A response that opens `<think>` but never
  closes it was cut off mid-reasoning: it has no answer part (None). A response without think
  tags is all answer part.
  """
  end = response.rfind(THINK_CLOSE)
  if end >= 0:
    return response[:end], response[end + len(THINK_CLOSE) :]
  if THINK_OPEN in response:
    return response, None
  return "", response


def _box_spans(text: str) -> list[tuple[int, int, str]]:
  """(start, end, content) of every closed top-level \\boxed{...}/\\fbox{...}, left to right."""
  spans, i = [], 0
  while True:
    starts = [p for p in (text.find(c, i) for c in _BOX_COMMANDS) if p >= 0]
    if not starts:
      return spans
    start = min(starts)
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    j = start + len(cmd)
    while j < len(text) and text[j] == " ":
      j += 1
    if j >= len(text) or text[j] != "{":
      i = start + len(cmd)
      continue
    depth, k = 0, j
    while k < len(text):
      if text[k] == "{":
        depth += 1
      elif text[k] == "}":
        depth -= 1
        if depth == 0:
          break
      k += 1
    if depth != 0:
      return spans  # unbalanced: nothing after this point is a closed box
    spans.append((start, k + 1, text[j + 1 : k]))
    i = k + 1


def boxed_answer(text: str) -> str | None:
  """The last boxed answer; trailing boxes joined only by commas/"and"/`$` are one answer.

  "\\boxed{1} and \\boxed{-2}" -> "1, -2". Falls back to `last_boxed_content` for the
  brace-less form "\\boxed 5".
  """
  spans = _box_spans(text)
  if not spans:
    last = last_boxed_content(text)
    return last.strip() if last is not None and last.strip() else None
  group = [spans[-1]]
  for prev in reversed(spans[:-1]):
    gap = _TEXT_IN_GAP.sub(r"\1", text[prev[1] : group[0][0]])
    if len(gap) > _MAX_JOIN_GAP or not set(gap) <= _JOINERS:
      break
    group.insert(0, prev)
  parts = [c.strip() for _, _, c in group if c.strip()]
  return ", ".join(parts) if parts else None


def extract_answer(response: str | bytes | None) -> str | None:
  """The final answer of a model response: the last boxed answer after `</think>`, or None."""
  if response is None:
    return None
  _, answer_part = split_reasoning(to_text(response))
  if answer_part is None:
    return None
  return boxed_answer(answer_part)
