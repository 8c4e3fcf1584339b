"""Collectives inside a compiled program's while loop, read from its HLO text.

    loop = main_loop_collectives(compiled.as_text(), param_sizes)
    loop.count, loop.bytes, loop.param_gathers   # per iteration of the loop, per device

The text is XLA's post-optimisation module (`Compiled.as_text()`): computations open with
`%name (...) -> ... {` (or `ENTRY %name ...`) and close with `}`; each instruction is
`%x = <type> <opcode>(<operands>), attr=..., ...`, operands named without their types. The
decode loop is the ENTRY computation's `while` with the largest body; its body, its
condition and every computation they call (fusions, nested loops, branches) are searched.

Bytes per device: an all-gather counts its result (the gathered array every device ends up
holding); all-reduce, reduce-scatter, all-to-all and collective-permute their operand.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
  """'(bf16[8,128]{1,0}, f32[])' -> [('bf16', (8, 128)), ('f32', ())]."""
  out = []
  for dt, dims in _ARRAY.findall(type_str):
    if dt in _ITEMSIZE or dt.startswith("f8"):
      out.append((dt, tuple(int(d) for d in dims.split(",") if d)))
  return out


def type_bytes(type_str: str) -> int:
  return sum(math.prod(d) * _ITEMSIZE.get(dt, 1) for dt, d in arrays(type_str))


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start] ('(' or '{')."""
  pairs = {"(": ")", "{": "}"}
  depth, opening = 0, text[start]
  for i in range(start, len(text)):
    if text[i] == opening:
      depth += 1
    elif text[i] == pairs[opening]:
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


@dataclasses.dataclass(frozen=True)
class Instr:
  name: str
  type: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str


def parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end() :]
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
  type_str, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _balanced(rest, op.end() - 1)
  operands = tuple(re.findall(r"%([\w.\-]+)", rest[op.end() : close - 1]))
  return Instr(m.group(1), type_str, op.group(1), operands, rest[close:])


def computations(hlo: str) -> tuple[dict[str, list[Instr]], str]:
  """({computation name: its instructions}, the ENTRY computation's name)."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    if current is None:
      h = _HEADER.match(line)
      if h and line.rstrip().endswith("{"):
        current = h.group(1)
        comps[current] = []
        entry = current if line.startswith("ENTRY") else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    ins = parse_instr(line)
    if ins is not None:
      comps[current].append(ins)
  return comps, entry


def _called(ins: Instr) -> list[str]:
  names = _CALLS.findall(ins.attrs)
  for group in _CALL_LISTS.findall(ins.attrs):
    names += re.findall(r"%([\w.\-]+)", group)
  return names


def reachable(comps: dict[str, list[Instr]], root: str) -> list[str]:
  seen, todo = [], [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.append(name)
    for ins in comps[name]:
      todo += _called(ins)
  return seen


@dataclasses.dataclass(frozen=True)
class Collective:
  opcode: str  # all-gather, all-reduce, ... ("-start" folded in)
  operand: str  # operand type(s), e.g. "bf16[384,12,128]"
  result: str
  bytes: int  # per device, see the module docstring
  op_name: str  # the JAX op that produced it (metadata)
  param_like: bool  # an all-gather whose result has a parameter's element count


@dataclasses.dataclass(frozen=True)
class LoopCollectives:
  body: str  # the while body computation's name
  collectives: tuple[Collective, ...]

  @property
  def count(self) -> int:
    return len(self.collectives)

  @property
  def bytes(self) -> int:
    return sum(c.bytes for c in self.collectives)

  @property
  def param_gathers(self) -> tuple[Collective, ...]:
    return tuple(c for c in self.collectives if c.param_like)

  def by_opcode(self) -> dict[str, tuple[int, int]]:
    """opcode -> (count, bytes per iteration)."""
    out: dict[str, tuple[int, int]] = {}
    for c in self.collectives:
      n, b = out.get(c.opcode, (0, 0))
      out[c.opcode] = (n + 1, b + c.bytes)
    return out

  def to_dict(self) -> dict:
    return {
      "body": self.body,
      "count": self.count,
      "bytes": self.bytes,
      "param_gathers": len(self.param_gathers),
      "param_gather_bytes": sum(c.bytes for c in self.param_gathers),
      "by_opcode": {k: {"count": n, "bytes": b} for k, (n, b) in self.by_opcode().items()},
      "ops": [dataclasses.asdict(c) for c in self.collectives],
    }


def _collectives_in(comps, names, param_sizes: frozenset[int]) -> list[Collective]:
  found = []
  for name in names:
    types = {ins.name: ins.type for ins in comps[name]}
    for ins in comps[name]:
      base = ins.opcode.removesuffix("-start")
      if base not in COLLECTIVES or ins.opcode.endswith("-done"):
        continue
      operand = ", ".join(types.get(o, "?") for o in ins.operands)
      result = ins.type
      if ins.opcode.endswith("-start") and ins.type.startswith("("):
        parts = arrays(ins.type)  # async start: (operand(s), result(s), [contexts])
        dt, dims = parts[len(ins.operands)] if len(parts) > len(ins.operands) else parts[-1]
        result = f"{dt}[{','.join(map(str, dims))}]"
      nbytes = type_bytes(result) if base == "all-gather" else type_bytes(operand)
      elems = {math.prod(d) for _, d in arrays(result)}
      op = _OP_NAME.search(ins.attrs)
      found.append(
        Collective(
          opcode=base,
          operand=operand,
          result=result,
          bytes=nbytes,
          op_name=op.group(1) if op else "",
          param_like=base == "all-gather" and bool(elems & param_sizes),
        )
      )
  return found


def main_loop_collectives(hlo: str, param_sizes=frozenset()) -> LoopCollectives | None:
  """The collectives of the ENTRY computation's largest while loop (one iteration);
  None when the program has no while loop. `param_sizes`: element counts of the
  parameters (full and per tensor shard) that mark an all-gather as a weight gather."""
  comps, entry = computations(hlo)
  loops = [ins for ins in comps.get(entry, []) if ins.opcode == "while"]
  best, best_size = None, -1
  for ins in loops:
    body = re.search(r"body=%([\w.\-]+)", ins.attrs)
    cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
    if not body:
      continue
    names = reachable(comps, body.group(1))
    names += [n for n in (reachable(comps, cond.group(1)) if cond else []) if n not in names]
    size = sum(len(comps[n]) for n in names)
    if size > best_size:
      best, best_size = (body.group(1), names), size
  if best is None:
    return None
  body, names = best
  return LoopCollectives(body, tuple(_collectives_in(comps, names, frozenset(param_sizes))))
