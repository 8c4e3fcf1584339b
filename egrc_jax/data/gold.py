"""Pulling answers out of LaTeX text: the last \\boxed{...} with nested braces.

Pure string scanning, no regex backtracking and no evaluation: safe on hostile model text.
"""

from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), braces balanced.

  Returns None when there is no box or the last box is never closed.
  """
  start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
  if start < 0:
    return None
  cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
  i = start + len(cmd)
  if text.startswith(" ", i) and not text.startswith("{", i):
    # "\boxed 5": the argument runs to the next whitespace or "$".
    rest = text[i + 1 :]
    end = min((p for p in (rest.find("$"), rest.find(" "), rest.find("\n")) if p >= 0), default=len(rest))
    return rest[:end].strip() or None
  if not text.startswith("{", i):
    return None
  depth = 0
  for j in range(i, len(text)):
    ch = text[j]
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1 : j]
  return None
