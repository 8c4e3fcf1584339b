"""Math answer equivalence: a cheap normalised-string fast path, then math-verify.

`is_equivalent(pred, gold)` runs in-process (the pool's workers call it). Safety: model text is
never evaluated as Python. math-verify is called with LaTeX extraction only: latex2sympy parses
with an ANTLR grammar into sympy objects (no eval); math-verify's plain-expression extractor,
which calls sympy `parse_expr` (an eval, though only on digit/operator regex matches), is never
used. `unsafe_reason` still refuses anything code-like, oversized, deeply nested, with exponent
towers or huge exponents/factorials before math-verify sees it; the pool's hard timeout is the
backstop for whatever slow input remains.
"""

from __future__ import annotations

import logging
import re

from egrc_jax.data.gold import canonical_number, last_boxed_content

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longest gold in the shared benchmarks is < 200 chars
MAX_BRACE_DEPTH = 12
# 9^{9^{9}} already has 370M digits; no shared gold nests exponents, so a prediction may nest
# them only as deep as its gold does (at least 1 level: x^2).
MAX_EXPONENT_DEPTH = 1
MAX_EXPONENT_DIGITS = 6  # 10^{123456} is 123k digits: fine; 10^{1234567} starts to hurt
# Python-ish names, but not LaTeX commands ("\\lambda" is a Greek letter, "lambda" is code).
_CODE_PATTERNS = re.compile(
  r"__|(?<!\\)\b(?:import|lambda|eval|exec|compile|getattr|setattr|globals|locals|subprocess|"
  r"open\s*\(|os\.|sys\.)"
)
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*-?\d{" + str(MAX_EXPONENT_DIGITS + 1) + ",}")
_BIG_FACTORIAL = re.compile(r"\d{4,}\s*!")

# -- normalisation ------------------------------------------------------------------------------
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_FRAC_VARIANTS = re.compile(r"\\[dt]frac")
_TEXT_WRAPPERS = re.compile(
  r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_PERCENT = re.compile(r"\\?%|\\percent")
# A true thousands separator: a comma between a 1-3 digit head and groups of exactly 3 digits,
# with no space after it, in a number that is not itself an item of a comma list ("5,1,234" and
# "1,234,5" are lists; "1, 234" is a list, so this runs before spaces are removed).
_THOUSANDS = re.compile(r"(?<![\d.])(?<!\d,)(\d{1,3})((?:,\d{3})+)(?!\d|,\d)")
_LETTER_CHOICE = re.compile(r"^\(?([A-Za-z])\)?$")
_UNIT_WORDS = re.compile(
  r"\s*\\(?:text|mbox|mathrm)\s*\{\s*(?:degrees?|cm|m|km|inches|inch|feet|foot|ft|units?|cents?|"
  r"dollars?|meters?|miles?|hours?|minutes?|seconds?|days?|square\s+\w+|sq\s+\w+|mph|"
  r"students?|people|ways?)\s*\}(?:\s*\^\s*\{?\d\}?)?\s*$"
)
_SCI_NOTATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)\s*$")
_BASE_SUBSCRIPT = re.compile(r"_\{(\d+)\}$")  # 4210_{5} -> 4210_5
_BASE_NUMBER = re.compile(r"^[0-9A-Za-z]+_\d+$")  # a numeral in base b: only an exact match
_VAR_ASSIGN = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(?=\S)")


def unsafe_reason(text: str, max_exponent_depth: int = MAX_EXPONENT_DEPTH) -> str | None:
  """Why `text` must not be parsed (code-like, too long, too deep, exponent tower), or None."""
  if len(text) > MAX_ANSWER_CHARS:
    return f"answer of {len(text)} chars > {MAX_ANSWER_CHARS}"
  if _CODE_PATTERNS.search(text):
    return "code-like pattern"
  depth = max_depth = 0
  for ch in text:
    if ch in "{([":
      depth += 1
      max_depth = max(max_depth, depth)
    elif ch in "})]":
      depth -= 1
  if max_depth > MAX_BRACE_DEPTH:
    return f"nesting depth {max_depth} > {MAX_BRACE_DEPTH}"
  if exponent_depth(text) > max_exponent_depth:
    return f"exponents nested deeper than {max_exponent_depth}"
  if _BIG_EXPONENT.search(text):
    return f"exponent with more than {MAX_EXPONENT_DIGITS} digits"
  if _BIG_FACTORIAL.search(text):
    return "factorial of a number with 4+ digits"
  return None


def exponent_depth(text: str) -> int:
  """Deepest nesting of exponents: "x^2" -> 1, "a^{b^{c}}" -> 2, "9^9^9" -> 2, "9**9**9" -> 2.

  One linear scan: a `{` right after `^` opens an exponent group one level deeper; a bare
  exponent (a digit run or one letter) followed directly by `^` chains (how parse_expr reads
  9**9**9), while "x^2y^2" does not.
  """
  text = text.replace("**", "^")
  best, cur, stack, chain, bare = 0, 0, [], 0, None  # bare: the brace-less exponent so far
  for ch in text:
    if ch == "^":
      chain = chain + 1 if bare and (bare.isdigit() or len(bare) == 1) else cur + 1
      best = max(best, chain)
      bare = ""
    elif ch == "{":
      stack.append(cur)
      if bare == "":
        cur = chain
      chain, bare = 0, None
    elif ch == "}":
      cur = stack.pop() if stack else 0
      chain, bare = 0, None
    elif bare is not None and ch.isspace():
      continue
    elif bare is not None and ch.isalnum() and (bare == "" or bare.isdigit() and ch.isdigit()):
      bare += ch
    else:
      chain, bare = 0, None
  return best


def normalize(text: str) -> str:
  """Canonical string for the fast path: spacing, \\left/\\right, \\dfrac, \\text{}, degrees,
  percent, thousands separators, `x =` prefixes, trailing dots, plain numbers, letter choices.

  Equal outputs mean equivalent answers; unequal outputs mean nothing (math-verify decides).
  """
  s = text.strip()
  if "\\boxed" in s or "\\fbox" in s:
    s = last_boxed_content(s) or s
  s = s.strip().strip("$").strip()
  s = _SPACING.sub("", s)
  s = _LEFT_RIGHT.sub("", s)
  s = _FRAC_VARIANTS.sub(r"\\frac", s)
  s = _UNIT_WORDS.sub("", s)
  for _ in range(3):  # nested \text{\textbf{x}}
    s = _TEXT_WRAPPERS.sub(r"\1", s)
  s = _DEGREES.sub("", s)
  s = _PERCENT.sub("", s)
  s = s.replace("\\$", "").replace("$", "")
  s = _VAR_ASSIGN.sub("", s)
  s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
  s = re.sub(r"\s+", "", s).rstrip(".")
  s = _BASE_SUBSCRIPT.sub(r"_\1", s)
  s = canonical_number(s)  # commas left now separate list items: "1, 2, 3" is not 123
  choice = _LETTER_CHOICE.match(s)
  if choice:
    return choice.group(1).upper()
  if s.isalpha():
    return s.lower()
  return s


def to_latex(answer: str) -> str:
  """An answer string as math-verify input: `$...$` around it, units and separators removed."""
  s = answer.strip()
  if "\\boxed" in s or "\\fbox" in s:
    s = last_boxed_content(s) or s
  s = s.strip()
  if s.startswith("$") and s.endswith("$") and not s.endswith("\\$"):
    s = s.strip("$").strip()
  s = _FRAC_VARIANTS.sub(r"\\frac", s)
  s = _UNIT_WORDS.sub("", s)
  s = re.sub(r"(\d),\\!\s*(?=\d{3})", r"\1", s)  # 10,\!080 -> 10080
  s = s.replace("\\$", "")
  s = re.sub(r"(?<!\\)\$", "", s)
  s = _SCI_NOTATION.sub(r"\1\\times 10^{\2}", s)  # 4.5e33: sympy reads "e" as Euler's number
  return f"${s}$"


def exact_match(pred: str | None, gold: str) -> bool:
  """Integer/number exact match after `normalize` (no sympy, no processes): the toy task."""
  return pred is not None and normalize(pred) == normalize(gold)


def is_equivalent(pred: str | None, gold: str, timeout_s: int = 2) -> bool:
  """True when the extracted answer `pred` equals `gold` mathematically.

  Order: normalised-string fast path; refuse unsafe predictions (`unsafe_reason`); then
  math-verify `verify(parse(gold), parse(pred))` with its own signal-based timeouts of
  `timeout_s` seconds per parse/compare (main thread only; the pool adds a hard kill on top).
  """
  if pred is None or not pred.strip():
    return False
  if len(pred) <= MAX_ANSWER_CHARS and normalize(pred) == normalize(gold):
    return True
  if _BASE_NUMBER.match(normalize(gold)):
    return False  # math-verify drops the base subscript: 2516_8 would equal 2516_9
  reason = unsafe_reason(pred, max(MAX_EXPONENT_DEPTH, exponent_depth(gold)))
  if reason is not None:
    logger.info("refusing to parse answer (%s): %.80r", reason, pred)
    return False
  # Imported here so exact-mode users and the parent process never pay the sympy import.
  from math_verify import LatexExtractionConfig, parse, verify

  # LaTeX extraction only: the plain-expression extractor (sympy parse_expr, an eval) would also
  # pull a stray number out of text, e.g. 7 out of "7<garbage>".
  config = [LatexExtractionConfig(boxed_match_priority=0)]
  gold_parsed = parse(to_latex(gold), extraction_config=config, parsing_timeout=timeout_s)
  pred_parsed = parse(to_latex(pred), extraction_config=config, parsing_timeout=timeout_s)
  if not gold_parsed or not pred_parsed:
    return False
  # allow_set_relation_comp: "x \\le 0" is the interval (-\\infty, 0] written as a relation.
  return bool(
    verify(gold_parsed, pred_parsed, allow_set_relation_comp=True, timeout_seconds=timeout_s)
  )
