"""Gold answers: the last \\boxed{...} with nested braces, and one gold string per benchmark row.

Pure string scanning, no regex backtracking and no evaluation: safe on hostile model text.
`gold_answer(benchmark, row)` is the one place that knows where each benchmark keeps its answer
(see ../shared/data/README.md); the grader normalises the returned string further.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")

BENCHMARKS = (
  "aime24",
  "amc23",
  "math500",
  "minerva_math",
  "olympiadbench",
  "gsm8k",
  "math_train",
  "answer",  # any file whose `answer` field is the plain final answer (e.g. the toy task)
)


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
    ends = (rest.find("$"), rest.find(" "), rest.find("\n"))
    end = min((p for p in ends if p >= 0), default=len(rest))
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


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# A number whose commas are all thousands separators: 1-3 leading digits, then groups of
# exactly 3. "1,234" and "12,345,678.5" are numbers; "1,2", "0,5" and "1,2345" are not.
_THOUSANDS_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def clean_number(text: str) -> str:
  """Plain numbers in canonical form: 27.0 -> 27, 025 -> 25, 1,234 -> 1234; others kept.

  Commas are removed only as true thousands separators: "1,2" and "0,5" stay as they are.
  """
  s = text.strip()
  if _THOUSANDS_NUMBER.fullmatch(s):
    s = s.replace(",", "")
  return canonical_number(s)


def canonical_number(text: str) -> str:
  """A plain number (digits, optional sign and decimals, no commas) in canonical form:
  27.0 -> 27, 025 -> 25, -0 -> 0; anything else is returned stripped, unchanged."""
  s = text.strip()
  if not _NUMBER.fullmatch(s):
    return s
  neg, s = s.startswith("-"), s.lstrip("-")
  whole, _, frac = s.partition(".")
  whole = whole.lstrip("0") or "0"
  frac = frac.rstrip("0")
  out = whole + ("." + frac if frac else "")
  return "-" + out if neg and out != "0" else out


def parse_list_literal(text: str) -> list[str]:
  """A Python list-of-strings literal like "['$x=1$', '$y=2$']" -> ['$x=1$', '$y=2$'].

  A tiny parser for quoted strings only (no ast/eval), used on gold data; raises ValueError on
  anything else.
  """
  s = text.strip()
  if not (s.startswith("[") and s.endswith("]")):
    raise ValueError(f"not a list literal: {text[:80]!r}; expected e.g. \"['2']\"")
  items, i, body = [], 0, s[1:-1]
  while i < len(body):
    ch = body[i]
    if ch in " ,\n\t":
      i += 1
      continue
    if ch not in "'\"":
      raise ValueError(f"list item must be a quoted string at {i} in {text[:80]!r}")
    j, buf = i + 1, []
    while j < len(body) and body[j] != ch:
      if body[j] == "\\" and j + 1 < len(body) and body[j + 1] in (ch, "\\"):
        j += 1  # only \\ and \' are escapes; "\frac" keeps its backslash
      buf.append(body[j])
      j += 1
    if j >= len(body):
      raise ValueError(f"unterminated string in list literal {text[:80]!r}")
    items.append("".join(buf))
    i = j + 1
  return items


def _strip_dollars(s: str) -> str:
  """ "$69$,$84$" -> "69,84"; "$(-\\infty, 0)$." -> "(-\\infty, 0)" (escaped "\\$" is kept)."""
  s = s.strip().rstrip(".").strip()
  s = re.sub(r"(?<!\\)\$\s*([,;])\s*(?<!\\)\$", r"\1 ", s)
  return re.sub(r"(?<!\\)\$", "", s).strip()


def _olympiad_gold(value) -> str:
  items = value if isinstance(value, list) else parse_list_literal(str(value))
  if not items:
    raise ValueError("olympiadbench row has an empty final_answer list")
  return ", ".join(_strip_dollars(str(x)) for x in items)


def _boxed_gold(benchmark: str, solution: str) -> str:
  box = last_boxed_content(solution)
  if box is None or not box.strip():
    raise ValueError(f"{benchmark}: no \\boxed{{...}} in solution {solution[-120:]!r}")
  return box.strip()


def gold_answer(benchmark: str, row: dict) -> str:
  """The gold final answer of one benchmark row, as a (LaTeX or plain) string.

  aime24/amc23: `answer` as a clean number ("27.0" -> "27", "025" -> "25"); math500 and
  answer: `answer` as is; minerva_math/math_train: last boxed of `solution`; olympiadbench:
  `final_answer` (a list or a list-literal string) joined with ", ", `$` stripped; gsm8k:
  the number after `####` in `answer`, thousands separators removed. Raises ValueError when
  the row has no gold answer.
  """
  if benchmark in ("aime24", "amc23"):
    value = row["answer"]
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    return clean_number(str(value))
  if benchmark in ("math500", "answer"):
    return str(row["answer"]).strip()
  if benchmark in ("minerva_math", "math_train"):
    return _boxed_gold(benchmark, row["solution"])
  if benchmark == "olympiadbench":
    return _olympiad_gold(row["final_answer"])
  if benchmark == "gsm8k":
    text = str(row["answer"])
    if "####" not in text:
      raise ValueError(f"gsm8k: no '####' in answer {text[-120:]!r}")
    return clean_number(text.rsplit("####", 1)[1])
  raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
