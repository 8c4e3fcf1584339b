"""The toy reasoning task: chained integer arithmetic with verbose chains of thought.

A problem is a start value and a chain of operations, e.g.
    "start 7 , add 5 , times 3 , minus 4 ."   answer 32
Every intermediate value stays in [0, value_max], so each step is a small, exactly
checkable fact ("12 * 3 = 36").

Two solution formats, both in the R1 shape (the chat template's generation prompt ends with
"<think>", the response is the reasoning, then "</think> \\boxed{N}"):
  * concise: the necessary steps only
      "7 + 5 = 12 . 12 * 3 = 36 . 36 - 4 = 32 . </think> \\boxed{32}"
  * verbose, `check_style="careful"` (the default): the same steps, plus re-checks that
    recompute the step by a route that needs only one-digit facts (the units digit first,
    with the carry or borrow in plain sight; tens and units products apart), then restate
    it, each with a varied opening ("hmm , let me verify that :"): "18 + 5 = 22 . wait , let
    me check : 8 + 5 = 13 , so 18 + 5 = 23 , not 22 ." Slips (a wrong units digit, frequent
    on steps from a two-digit value) are caught by such a check, and the chain goes on from
    the checked value.
  * verbose, `check_style="restate"` (the first design, docs/toy.md): re-checks opened by
    connectors ("wait", "hmm", "so", "therefore", "alternatively", "let me ...") that only
    restate or invert a step already made, and planted slips (a step first computed wrong,
    then "wait , that is wrong ." and the right value).
  * verbose, `check_style="column"` (tried for the entropy-conflict variant and kept as an
    option; the default SFT model cannot run these checks, docs/toy_conflict.md):
    problems with two-digit operands (e.g. `task.operand_max=40`); re-checks recompute a
    step with a two-digit number in columns of one-digit facts ("7 + 8 = 15 , 4 + 3 + 1 =
    8 , so 47 + 38 = 85"), and such steps are first written wrong with `slip_prob_2d`.
  In all, the answer is always computable from the necessary steps alone: the verbose part
  is removable.

Train and test are split by a stable hash of the problem text, so they are disjoint by
construction and each problem's split does not depend on how many were drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

OPS = ("add", "minus", "times")
_SYMBOL = {"add": "+", "minus": "-", "times": "*"}
CONNECTORS = ("wait", "hmm", "but", "so", "therefore", "alternatively", "let", "okay")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  min_ops: int = 2  # fewest operations in a chain
  max_ops: int = 3  # most operations in a chain
  start_max: int = 9  # start value drawn from [1, start_max]
  operand_max: int = 5  # add / minus operands drawn from [1, operand_max]
  times_max: int = 3  # times operands drawn from [2, times_max]
  value_max: int = 40  # every intermediate value stays in [0, value_max]
  test_percent: int = 10  # share of the problem space (by text hash) that is held out

  def __post_init__(self):
    if not 1 <= self.min_ops <= self.max_ops:
      raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
    if not 1 <= self.start_max <= self.value_max:
      raise ValueError(f"start_max={self.start_max} must lie in [1, value_max={self.value_max}]")
    if self.operand_max < 1 or self.times_max < 2:
      raise ValueError(
        f"operand_max={self.operand_max} must be >= 1 and times_max={self.times_max} >= 2"
      )
    if not 0 < self.test_percent < 100:
      raise ValueError(f"test_percent={self.test_percent} must be in (0, 100)")


@dataclasses.dataclass(frozen=True)
class CotConfig:
  """Knobs of the verbose chain-of-thought generator (all probabilities in [0, 1])."""

  # "careful" (recomputing re-checks) | "restate" (restating) | "column" (column arithmetic
  # for two-digit operands, tried for the entropy-conflict variant: docs/toy_conflict.md)
  check_style: str = "careful"
  recheck_prob: float = 0.8  # after each step (and each re-check), P(one more re-check)
  max_rechecks: int = 10  # cap on re-checks per solution
  slip_prob: float = 0.1  # P(a step is first written wrong; "careful": from a one-digit value)
  # "careful": P(a step from a two-digit value is first written wrong); "column": P(a step
  # with a two-digit number, `hard_step`, is first written wrong)
  slip_prob_2d: float = 0.5
  fix_prob: float = 1.0  # P(a slip is caught by a re-check and fixed); else carried on
  preamble_prob: float = 0.5  # P("okay , let me work through this step by step .")
  conclusion_prob: float = 0.5  # P("so the final answer is N .") before </think>

  def __post_init__(self):
    if self.check_style not in CHECK_STYLES:
      raise ValueError(f"check_style={self.check_style!r}: use one of {CHECK_STYLES}")
    names = ("recheck_prob", "slip_prob", "slip_prob_2d", "fix_prob", "preamble_prob",
             "conclusion_prob")  # fmt: skip
    for name in names:
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} must be a probability in [0, 1]")
    if self.max_rechecks < 0:
      raise ValueError(f"max_rechecks={self.max_rechecks} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Problem:
  start: int
  ops: tuple[tuple[str, int], ...]  # (op name, operand) in order

  @property
  def text(self) -> str:
    parts = [f"start {self.start}"] + [f"{op} {b}" for op, b in self.ops]
    return " , ".join(parts) + " ."

  @property
  def values(self) -> list[int]:
    """The value after each operation (the last one is the answer)."""
    out, v = [], self.start
    for op, b in self.ops:
      v = apply_op(v, op, b)
      out.append(v)
    return out

  @property
  def answer(self) -> int:
    return self.values[-1]

  @property
  def id(self) -> str:
    return hashlib.sha1(self.text.encode()).hexdigest()[:12]

  def is_test(self, cfg: TaskConfig) -> bool:
    return int(hashlib.sha1(self.text.encode()).hexdigest(), 16) % 100 < cfg.test_percent


def apply_op(v: int, op: str, b: int) -> int:
  if op == "add":
    return v + b
  if op == "minus":
    return v - b
  if op == "times":
    return v * b
  raise ValueError(f"unknown op {op!r}; known: {OPS}")


def sample_problem(rng: np.random.Generator, cfg: TaskConfig) -> Problem:
  """One problem whose every intermediate value lies in [0, value_max]."""
  n = int(rng.integers(cfg.min_ops, cfg.max_ops + 1))
  v = int(rng.integers(1, cfg.start_max + 1))
  start, ops = v, []
  for _ in range(n):
    legal = []
    for b in range(1, cfg.operand_max + 1):
      if v + b <= cfg.value_max:
        legal.append(("add", b))
      if v - b >= 0:
        legal.append(("minus", b))
    for b in range(2, cfg.times_max + 1):
      if v * b <= cfg.value_max:
        legal.append(("times", b))
    # Pick the op uniformly first, then its operand, so "times" is not drowned out.
    kinds = sorted({op for op, _ in legal})
    kind = kinds[int(rng.integers(len(kinds)))]
    choices = [x for x in legal if x[0] == kind]
    op, b = choices[int(rng.integers(len(choices)))]
    ops.append((op, b))
    v = apply_op(v, op, b)
  return Problem(start, tuple(ops))


def make_splits(
  cfg: TaskConfig, num_train: int, num_test: int, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
  """Distinct problems, split by text hash: (train, test), deterministic per seed."""
  rng = np.random.default_rng(seed)
  seen: set[str] = set()
  train: list[Problem] = []
  test: list[Problem] = []
  tries = 0
  while len(train) < num_train or len(test) < num_test:
    tries += 1
    if tries > 50 * (num_train + num_test) + 10_000:
      raise ValueError(
        f"could only draw {len(train)} train / {len(test)} test distinct problems; the "
        f"problem space of {cfg} is too small: raise max_ops or the value ranges"
      )
    p = sample_problem(rng, cfg)
    if p.text in seen:
      continue
    seen.add(p.text)
    split = test if p.is_test(cfg) else train
    if len(split) < (num_test if split is test else num_train):
      split.append(p)
  return train, test


# -- solutions ---------------------------------------------------------------------------


def _eq(a: int, op: str, b: int, c: int) -> str:
  return f"{a} {_SYMBOL[op]} {b} = {c}"


def _final(answer: int) -> str:
  return f"</think> \\boxed{{{answer}}}"


def concise_cot(p: Problem) -> str:
  """The necessary steps only (the reference length a compressed policy can reach)."""
  steps, v = [], p.start
  for op, b in p.ops:
    c = apply_op(v, op, b)
    steps.append(_eq(v, op, b, c) + " .")
    v = c
  return " ".join(steps) + " " + _final(v)


def _recheck(rng: np.random.Generator, a: int, op: str, b: int, c: int) -> str:
  """A redundant re-check of the step a op b = c: restated, or inverted."""
  eq = _eq(a, op, b, c)
  if op == "add":
    inverse = f"{c} - {b} = {a}"
  elif op == "minus":
    inverse = f"{c} + {b} = {a}"
  else:
    inverse = f"{b} * {a} = {c}"
  # (template, weight): "wait" opens half of them, as in R1-style traces, so that at a
  # sampling temperature below 1 the re-check decision is not drowned by the one next-step
  # token.
  templates = (
    (f"wait , let me verify : {eq} . yes , that is right .", 0.3),
    (f"wait , is {eq} ? yes , {c} .", 0.2),
    (f"hmm , let me check that again . {eq} . correct .", 0.1),
    (f"so {eq} , and the value is {c} .", 0.1),
    (f"therefore the value is {c} .", 0.1),
    (f"alternatively , {inverse} , so it checks out .", 0.1),
    (f"let me double check : {eq} . yes .", 0.1),
  )
  k = rng.choice(len(templates), p=[w for _, w in templates])
  return templates[int(k)][0]


def _slip(rng: np.random.Generator, c: int) -> int:
  """A plausible wrong result for a step whose right result is c (never negative)."""
  deltas = [d for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0]
  return c + deltas[int(rng.integers(len(deltas)))]


_OPENERS = ("wait", "hmm", "but", "okay", "so")
_VERBS = ("check", "verify", "double check")
_OBJECTS = ("", " that", " that again", " this", " it")


def check_opener(rng: np.random.Generator) -> str:
  """The opening "<connector> , let me <verb>[ <object>] :", each part drawn uniformly: the
  phrasing varies as a real model's does, so a re-check is a high-entropy stretch of text."""

  def pick(xs):
    return xs[int(rng.integers(len(xs)))]

  return f"{pick(_OPENERS)} , let me {pick(_VERBS)}{pick(_OBJECTS)} :"


def careful_check(
  rng: np.random.Generator, a: int, op: str, b: int, c: int, wrong: int | None = None
) -> str:
  """A re-check of a op b = c that recomputes it from one-digit facts (for a two-digit a):
  add / minus the units digit first, borrowing ten when needed ("13 - 4 = 9 , so 23 - 4 =
  19"); times the tens and the units apart. A one-digit step is restated. `wrong`: the value
  first written, which the check rejects (", not 22")."""
  u = a % 10
  parts = []
  if a >= 10:
    if op == "add":
      parts.append(f"{u} + {b} = {u + b}")
    elif op == "minus":
      uu = u if u >= b else u + 10
      parts.append(f"{uu} - {b} = {uu - b}")
    else:
      parts += [f"{a - u} * {b} = {(a - u) * b}", f"{u} * {b} = {u * b}"]
  parts.append(("so " if parts else "") + _eq(a, op, b, c))
  text = check_opener(rng) + " " + " , ".join(parts)
  return text + (f" , not {wrong} ." if wrong is not None else " .")


def _units_slip(rng: np.random.Generator, c: int) -> int:
  """A wrong units digit: c +- 1 or 2 (never negative, unless an unfixed slip carried a
  negative value on, which only moves up)."""
  deltas = [d for d in (-2, -1, 1, 2) if c + d >= 0] or [1, 2]
  return c + deltas[int(rng.integers(len(deltas)))]


def _flagged_fix(rng, a: int, op: str, b: int, c: int, wrong: int) -> str:
  del rng  # the restate style's fix has one wording
  return f"wait , that is wrong . {_eq(a, op, b, c)} , not {wrong} ."


def column_check(
  rng: np.random.Generator, a: int, op: str, b: int, c: int, wrong: int | None = None
) -> str:
  """A re-check of a op b = c in columns, one-digit facts only, for steps with a two-digit
  number (`hard_step`): add / minus the units, then the tens with the carry or borrow
  written out ("7 + 8 = 15 , 4 + 3 + 1 = 8 , so 47 + 38 = 85"; "2 - 7 borrows": "12 - 7 = 5
  , 6 - 3 - 1 = 2 , so 62 - 37 = 25"); times the tens and the units apart, then their sum
  ("30 * 3 = 90 , 2 * 3 = 6 , 90 + 6 = 96 , so 32 * 3 = 96"). Every number it writes is a
  one-digit fact's or a copy, so the final restatement can be read off the columns. A
  one-digit step is restated. `wrong`: the value first written, which the check rejects."""
  parts = []
  if hard_step(a, op, b):
    ua, ta, ub, tb = a % 10, a // 10, b % 10, b // 10
    if op == "add":
      carry = (ua + ub) // 10
      parts.append(f"{ua} + {ub} = {ua + ub}")
      parts.append(f"{ta} + {tb}" + (" + 1" if carry else "") + f" = {ta + tb + carry}")
    elif op == "minus":
      borrow = int(ua < ub)
      parts.append(f"{ua + 10 * borrow} - {ub} = {ua + 10 * borrow - ub}")
      parts.append(f"{ta} - {tb}" + (" - 1" if borrow else "") + f" = {ta - tb - borrow}")
    else:
      parts += [f"{10 * ta} * {b} = {10 * ta * b}", f"{ua} * {b} = {ua * b}",
                f"{10 * ta * b} + {ua * b} = {c}"]  # fmt: skip
  parts.append(("so " if parts else "") + _eq(a, op, b, c))
  text = check_opener(rng) + " " + " , ".join(parts)
  return text + (f" , not {wrong} ." if wrong is not None else " .")


def hard_step(a: int, op: str, b: int) -> bool:
  """A step the "column" style treats as hard: a two-digit number in it (add / minus: either
  operand; times: the multiplicand). Only values below 100 are in columns of two."""
  return a >= 10 or (op != "times" and b >= 10)


class _Style(NamedTuple):
  slip: Callable[..., int]  # (rng, c) -> a wrong result
  fix: Callable[..., str]  # (rng, a, op, b, c, wrong) -> the re-check that catches it
  recheck: Callable[..., str]  # (rng, a, op, b, c) -> a re-check of a right step
  # (a, op, b) -> whether the step slips with slip_prob_2d (else slip_prob); None: never
  hard: Callable[..., bool] | None


_STYLES = {
  "careful": _Style(_units_slip, careful_check, careful_check, lambda a, op, b: a >= 10),
  "restate": _Style(_slip, _flagged_fix, _recheck, None),
  "column": _Style(_slip, column_check, column_check, hard_step),
}
CHECK_STYLES = tuple(_STYLES)


def verbose_cot(p: Problem, rng: np.random.Generator, cfg: CotConfig) -> tuple[str, int]:
  """A verbose solution and the answer it boxes (wrong only if a slip went unfixed).

  After each step, re-checks are appended while U < recheck_prob (at most max_rechecks per
  solution), so their count per step is geometric. A slip writes a wrong result; with
  fix_prob it is caught: "careful" follows it with a recomputing check that rejects it,
  "restate" with "wait , that is wrong . <right step>". Otherwise the chain carries the
  wrong value on.
  """
  style = _STYLES[cfg.check_style]
  parts: list[str] = []
  if rng.random() < cfg.preamble_prob:
    parts.append("okay , let me work through this step by step .")
  v, rechecks = p.start, 0
  for op, b in p.ops:
    c = apply_op(v, op, b)
    hard = style.hard is not None and style.hard(v, op, b)
    if rng.random() < (cfg.slip_prob_2d if hard else cfg.slip_prob):
      wrong = style.slip(rng, c)
      parts.append(_eq(v, op, b, wrong) + " .")
      if rng.random() < cfg.fix_prob:
        parts.append(style.fix(rng, v, op, b, c, wrong))
      else:
        c = wrong
    else:
      parts.append(_eq(v, op, b, c) + " .")
    while rechecks < cfg.max_rechecks and rng.random() < cfg.recheck_prob:
      parts.append(style.recheck(rng, v, op, b, c))
      rechecks += 1
    v = c
  if rng.random() < cfg.conclusion_prob:
    parts.append(f"so the final answer is {v} .")
  parts.append(_final(v))
  return " ".join(parts), v


def sft_examples(
  problems: list[Problem], cfg: CotConfig, seed: int = 0
) -> list[tuple[Problem, str, int]]:
  """(problem, verbose response, boxed answer) for each problem, deterministic per seed."""
  rng = np.random.default_rng(seed)
  out = []
  for p in problems:
    text, boxed = verbose_cot(p, rng, cfg)
    out.append((p, text, boxed))
  return out


def connector_words(text: str) -> int:
  """How many whitespace-separated words of `text` are connectors (CONNECTORS)."""
  return sum(w in CONNECTORS for w in text.split())
