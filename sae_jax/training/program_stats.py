"""A compiled JAX function read as a program: collectives, scatters and loops in its optimized HLO.

`program_stats(jax.jit(f).lower(...).compile())` parses `compiled.as_text()` (the HLO after XLA's
optimisation and SPMD partitioning, so shapes are per-device) into:

- every collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, plus
  ragged-all-to-all and collective-broadcast), with the computation that holds it, the bytes of its
  result, whether it runs inside a while loop, and how many times it runs per call;
- every `scatter` instruction (fused ones included: a fusion's body is its own computation);
- every while loop with XLA's `known_trip_count`, when the backend attached one.

A computation is "in a loop" when it is a while body or condition, or is called (through `calls=`,
`to_apply=`, `branch_computations=`, `called_computations=`, ...) from one, transitively. How many
times a computation runs per call of the ENTRY computation is the sum, over the instructions that
call it, of the caller's count times that call's trip count (1 for calls that are not while loops;
conditional branches count as taken every time, an upper bound). A while loop without a known trip
count is counted as running once, and everything inside it has `trip_count_known=False`.

Async collectives are counted once per start/done pair: `all-reduce-start` ... `all-reduce-done`
becomes one "all-reduce" whose bytes are the done's result (a start's result also carries its
operands). Generic `async-start` wrappers are not counted themselves; the collective inside their
wrapped computation is, attributed to the wrapper's caller.

`flops_with_trip_counts(compiled)` exists because `compiled.cost_analysis()` counts a while body
once, whatever its trip count. It counts matrix products only (see its docstring).

The parser is plain text processing (no JAX import), so hand-written HLO works as well as
`as_text()` output. Two things about the printed HLO of current XLA worth knowing: operands are
printed as bare names (`all-reduce(%wrapped_scatter)`), so operand shapes come from a per-
computation table of instruction and parameter types; and the text starts with FileNames /
StackFrames tables that are not computations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

COLLECTIVE_OPS = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "ragged-all-to-all",
  "collective-broadcast",
)
_COLLECTIVE_SET = frozenset(COLLECTIVE_OPS)

# Attributes whose value names called computations (a single `%name` or a `{%a, %b}` list).
_CALL_ATTRS = (
  "to_apply",
  "calls",
  "body",
  "condition",
  "branch_computations",
  "called_computations",
  "true_computation",
  "false_computation",
  "select",
  "scatter",
  "comparator",
)
_CALL_RE = re.compile(r"(?:^|[\s,])(" + "|".join(_CALL_ATTRS) + r")=(\{[^}]*\}|%?[\w.\-]+)")
_NAME_RE = re.compile(r"%?([\w.\-]+)")
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*")
_INT_LIST_RE = r"=\{([\d,\s]*)\}"


# ------------------------------------------------------------------------------ results


@dataclasses.dataclass
class Collective:
  """One collective of the program (an async start/done pair counts once)."""

  op: str  # base name, one of COLLECTIVE_OPS ("all-reduce-start" -> "all-reduce")
  computation: str  # HLO computation holding it
  bytes: int  # bytes of its result (summed over tuple elements), per device
  in_loop: bool  # inside a while body/condition, transitively
  trip_count: int  # times it runs per call of the program (product of enclosing trip counts)
  trip_count_known: bool = True  # False if an enclosing while loop had no known_trip_count
  name: str = ""  # instruction name, e.g. "all-reduce.5"


@dataclasses.dataclass
class ProgramStats:
  """What `parse_hlo` found in one HLO module."""

  collectives: list[Collective]
  scatters: list[tuple[str, tuple[int, ...], bool]]  # (computation, operand shape, in_loop)
  while_loops: list[tuple[str, int]]  # (body computation, trip count or -1)

  def collectives_in_loops(self) -> list[Collective]:
    """The collectives that run inside a while loop."""
    return [c for c in self.collectives if c.in_loop]

  def collective_bytes_per_step(self) -> int:
    """Bytes moved by collectives in one call of the program: sum of bytes * trip_count."""
    return sum(c.bytes * c.trip_count for c in self.collectives)

  def count(self, op: str) -> int:
    """Number of collectives of kind `op` ("all-reduce", ...; "-start" forms are normalised)."""
    return sum(c.op == _base_op(op) for c in self.collectives)

  def to_json(self) -> dict:
    """Summary counts and bytes, JSON-serialisable, for one benchmark record."""
    by_op: dict[str, dict[str, int]] = {}
    for c in self.collectives:
      entry = by_op.setdefault(c.op, dict(count=0, in_loops=0, bytes=0, bytes_per_step=0))
      entry["count"] += 1
      entry["in_loops"] += int(c.in_loop)
      entry["bytes"] += c.bytes
      entry["bytes_per_step"] += c.bytes * c.trip_count
    return dict(
      collectives=len(self.collectives),
      collectives_in_loops=len(self.collectives_in_loops()),
      collective_bytes=sum(c.bytes for c in self.collectives),
      collective_bytes_per_step=self.collective_bytes_per_step(),
      collectives_by_op=by_op,
      scatters=len(self.scatters),
      scatters_in_loops=sum(in_loop for _, _, in_loop in self.scatters),
      while_loops=len(self.while_loops),
      trip_counts=[n for _, n in self.while_loops],
      trip_counts_known=all(c.trip_count_known for c in self.collectives)
      and all(n >= 0 for _, n in self.while_loops),
    )


# ------------------------------------------------------------------------------ shapes


def _dtype_bits(dtype: str) -> Optional[int]:
  """Bits per element of an HLO element type; None for names that are not element types."""
  if dtype == "pred":
    return 8
  if dtype == "token":
    return 0
  m = re.fullmatch(r"(?:bf|[sufc])(\d+)(?:e\d+m\d+\w*)?", dtype)
  return int(m.group(1)) if m else None


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in a (possibly tuple) HLO type string, in order."""
  out = []
  for dtype, dims in _ARRAY_RE.findall(type_str):
    if _dtype_bits(dtype) is None:
      continue
    out.append((dtype, tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())))
  return out


def _type_bytes(type_str: str) -> int:
  """Bytes of an HLO type: summed over tuple elements, sub-byte types rounded up per array."""
  return sum(math.ceil(_dtype_bits(dtype) * math.prod(dims) / 8) for dtype, dims in _arrays(type_str))


def _first_dims(type_str: str) -> tuple[int, ...]:
  arrays = _arrays(type_str)
  return arrays[0][1] if arrays else ()


# ------------------------------------------------------------------------------ parsing


@dataclasses.dataclass
class _Instr:
  name: str
  type_str: str
  opcode: str
  operands: list[str]  # raw operand texts ("%x" or "f32[2]{0} %x")
  attrs: str  # everything after the operand list
  callees: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (attribute, computation)
  trip_count: Optional[int] = None


@dataclasses.dataclass
class _Computation:
  name: str
  is_entry: bool
  instrs: list[_Instr] = dataclasses.field(default_factory=list)
  types: dict[str, str] = dataclasses.field(default_factory=dict)  # value name -> type string


def _scan_balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i] (quotes respected)."""
  depth, quoted = 0, False
  while i < len(s):
    ch = s[i]
    if quoted:
      if ch == "\\":
        i += 1
      elif ch == '"':
        quoted = False
    elif ch == '"':
      quoted = True
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return len(s)


def _scan_type(s: str, i: int) -> int:
  """Index just past an HLO type starting at s[i] (ends at the first space outside brackets)."""
  depth = 0
  while i < len(s):
    ch = s[i]
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == " " and depth == 0:
      return i
    i += 1
  return i


def _split_top(s: str) -> list[str]:
  """Split on commas that are outside brackets and quotes."""
  parts, depth, quoted, start = [], 0, False, 0
  for i, ch in enumerate(s):
    if quoted:
      quoted = ch != '"'
    elif ch == '"':
      quoted = True
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(s[start:i])
      start = i + 1
  parts.append(s[start:])
  return [p.strip() for p in parts if p.strip()]


def _parse_instr(line: str) -> Optional[_Instr]:
  s = line.strip()
  if s.startswith("ROOT "):
    s = s[5:].lstrip()
  eq = s.find(" = ")
  if eq <= 0:
    return None
  name = s[:eq].strip().lstrip("%")
  i = eq + 3
  j = _scan_type(s, i)
  type_str = s[i:j]
  m = re.match(r"\s*([\w\-]+)\(", s[j:])
  if not m:
    return None
  opcode = m.group(1)
  k = j + m.end() - 1
  end = _scan_balanced(s, k)
  operands = _split_top(s[k + 1 : end - 1])
  attrs = s[end:]
  instr = _Instr(name, type_str, opcode, operands, attrs)
  unquoted = _QUOTED_RE.sub('""', attrs)
  for attr, value in _CALL_RE.findall(unquoted):
    for callee in _NAME_RE.findall(value):
      instr.callees.append((attr, callee))
  if opcode == "while":
    trip = _TRIP_RE.search(attrs)
    instr.trip_count = int(trip.group(1)) if trip else None
  return instr


def _parse_module(text: str) -> dict[str, _Computation]:
  comps: dict[str, _Computation] = {}
  current: Optional[_Computation] = None
  for raw in text.splitlines():
    line = raw.strip()
    if not line:
      continue
    if current is None:
      if line[0].isdigit():  # FileNames / StackFrames tables: `1 {file_location_id=...}`
        continue
      m = _HEADER_RE.match(line)
      if not m or not line.endswith("{") or line.startswith("HloModule"):
        continue
      current = _Computation(m.group(2), bool(m.group(1)))
      if line[m.end() :].startswith("("):  # (name: type, ...) -> result type {
        params = line[m.end() : _scan_balanced(line, m.end())][1:-1]
        for param in _split_top(params):
          pname, _, ptype = param.partition(":")
          current.types[pname.strip().lstrip("%")] = ptype.strip()
      comps[current.name] = current
      continue
    if line.startswith("}"):
      current = None
      continue
    instr = _parse_instr(line)
    if instr is not None:
      current.instrs.append(instr)
      current.types[instr.name] = instr.type_str
  return comps


def _operand(comp: _Computation, text: str) -> tuple[str, str]:
  """(name, type string) of an operand given as "%x" or "f32[2]{0} %x"."""
  head, _, last = text.rpartition(" ")
  name = last.lstrip("%")
  return name, (head.strip() or comp.types.get(name, ""))


@dataclasses.dataclass
class _Reach:
  count: dict[str, int]  # executions per program call
  in_loop: dict[str, bool]
  known: dict[str, bool]


def _reachability(comps: dict[str, _Computation]) -> _Reach:
  """Execution counts, in-loop flags and trip-count-known flags for every computation."""
  edges: dict[str, list[tuple[str, int, bool, bool]]] = {n: [] for n in comps}  # callee, factor, loop, known
  called: set[str] = set()
  for comp in comps.values():
    for instr in comp.instrs:
      for attr, callee in instr.callees:
        if callee not in comps:
          continue
        loop = instr.opcode == "while" and attr in ("body", "condition")
        factor = (instr.trip_count or 1) if loop else 1
        edges[comp.name].append((callee, factor, loop, not loop or instr.trip_count is not None))
        called.add(callee)
  roots = [n for n, c in comps.items() if c.is_entry] or [n for n in comps if n not in called]
  order, seen = [], set()

  def visit(n: str) -> None:  # post-order DFS; the call graph of an HLO module is acyclic
    seen.add(n)
    for callee, *_ in edges[n]:
      if callee not in seen:
        visit(callee)
    order.append(n)

  for r in roots:
    if r not in seen:
      visit(r)
  count = {n: 0 for n in comps}
  in_loop = {n: False for n in comps}
  known = {n: True for n in comps}
  for r in roots:
    count[r] = 1
  for n in reversed(order):  # callers before callees
    for callee, factor, loop, k in edges[n]:
      count[callee] += count[n] * factor
      in_loop[callee] = in_loop[callee] or in_loop[n] or loop
      known[callee] = known[callee] and known[n] and k
  return _Reach(count, in_loop, known)


def _base_op(opcode: str) -> str:
  for suffix in ("-start", "-update", "-done"):
    if opcode.endswith(suffix):
      return opcode[: -len(suffix)]
  return opcode


def parse_hlo(text: str) -> ProgramStats:
  """Collectives, scatters and while loops of an HLO module's text (e.g. `compiled.as_text()`)."""
  comps = _parse_module(text)
  reach = _reachability(comps)
  # Computations wrapped by generic async-start report their collectives under the caller; those
  # wrapped by a sugared "<collective>-start" are skipped (the start itself is counted).
  async_parent: dict[str, str] = {}
  skip: set[str] = set()
  for comp in comps.values():
    for instr in comp.instrs:
      if instr.opcode == "async-start":
        for _, callee in instr.callees:
          async_parent[callee] = comp.name
      elif instr.opcode.endswith("-start") and _base_op(instr.opcode) in _COLLECTIVE_SET:
        skip.update(callee for attr, callee in instr.callees if attr == "calls")

  collectives: list[Collective] = []
  scatters: list[tuple[str, tuple[int, ...], bool]] = []
  while_loops: list[tuple[str, int]] = []
  for comp in comps.values():
    where = async_parent.get(comp.name, comp.name)
    loop, trips, known = reach.in_loop[comp.name], max(reach.count[comp.name], 1), reach.known[comp.name]
    pending: dict[str, Collective] = {}  # start/update name -> collective awaiting its done
    for instr in comp.instrs:
      op, base = instr.opcode, _base_op(instr.opcode)
      if op == "while":
        body = next((c for a, c in instr.callees if a == "body"), "")
        while_loops.append((body, -1 if instr.trip_count is None else instr.trip_count))
      elif op == "scatter":
        shape = _first_dims(_operand(comp, instr.operands[0])[1]) if instr.operands else ()
        scatters.append((comp.name, shape, loop))
      if base not in _COLLECTIVE_SET or comp.name in skip:
        continue
      if op == base:
        nbytes = _type_bytes(instr.type_str)
        collectives.append(Collective(base, where, nbytes, loop, trips, known, instr.name))
      elif op.endswith("-start"):
        # Fallback bytes if no done turns up: all-reduce-start's result is the result; the others
        # return (operands, result, ...context), so take element 1.
        arrays = _split_top(instr.type_str[1:-1]) if instr.type_str.startswith("(") else [instr.type_str]
        guess = instr.type_str if base == "all-reduce" or len(arrays) < 2 else arrays[1]
        pending[instr.name] = Collective(base, where, _type_bytes(guess), loop, trips, known, instr.name)
      else:
        src = _operand(comp, instr.operands[0])[0] if instr.operands else ""
        col = pending.pop(src, None)
        if col is None:
          continue
        if op.endswith("-update"):
          pending[instr.name] = col
        else:
          col.bytes = _type_bytes(instr.type_str)
          collectives.append(col)
    collectives.extend(pending.values())
  return ProgramStats(collectives, scatters, while_loops)


def _hlo_text(compiled: Any) -> str:
  if isinstance(compiled, str):
    return compiled
  text = compiled.as_text()
  if not isinstance(text, str):
    raise ValueError(f"{type(compiled).__name__}.as_text() gave no HLO text")
  return text


def program_stats(compiled: Any) -> ProgramStats:
  """`parse_hlo` of a compiled function's optimized HLO (`jax.jit(f).lower(...).compile()`).

  An HLO text string is accepted as well.
  """
  return parse_hlo(_hlo_text(compiled))


# ------------------------------------------------------------------------------ FLOPs


def _int_attr(attrs: str, key: str) -> list[int]:
  m = re.search(re.escape(key) + _INT_LIST_RE, attrs)
  return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


def _gemm_contracting(attrs: str) -> Optional[list[int]]:
  """lhs contracting dims from a cuBLAS gemm custom-call's backend_config, if any."""
  m = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', attrs)
  if not m:
    return None
  return [int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip()]


def _instr_flops(comp: _Computation, instr: _Instr) -> float:
  op = instr.opcode
  gemm = op == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', instr.attrs)
  if op == "dot" or gemm:
    contracting = (
      _int_attr(instr.attrs, "lhs_contracting_dims") if op == "dot" else _gemm_contracting(instr.attrs)
    )
    if contracting is None or not instr.operands:
      return 0.0
    lhs = _first_dims(_operand(comp, instr.operands[0])[1])
    if any(c >= len(lhs) for c in contracting):
      return 0.0
    return 2.0 * math.prod(_first_dims(instr.type_str)) * math.prod(lhs[c] for c in contracting)
  if op == "convolution" and len(instr.operands) >= 2:
    kernel = _first_dims(_operand(comp, instr.operands[1])[1])
    labels = re.search(r"dim_labels=\w+_(\w+)->", instr.attrs)
    if not kernel or not labels or "o" not in labels.group(1) or len(labels.group(1)) != len(kernel):
      return 0.0
    out_features = kernel[labels.group(1).index("o")]
    return 2.0 * math.prod(_first_dims(instr.type_str)) * math.prod(kernel) / max(out_features, 1)
  return 0.0


def flops_with_trip_counts(compiled: Any) -> float:
  """FLOPs of one call of the program, counting while bodies as many times as they run.

  `compiled.cost_analysis()["flops"]` counts a while body once. This estimate counts matrix
  products ONLY: `dot` (2 * prod(output dims) * prod(lhs contracting dims)), `convolution`
  (2 * prod(output dims) * prod(kernel dims) / kernel output features) and cuBLAS gemm custom-calls
  (contracting dims read from their backend_config), each multiplied by how many times its
  computation runs (the product of the known trip counts of the enclosing loops; a loop without a
  known trip count counts once). Elementwise ops, reductions, sorts, transcendentals and library
  calls other than gemms (cuDNN convolutions, ...) are not counted.
  """
  comps = _parse_module(_hlo_text(compiled))
  reach = _reachability(comps)
  return float(
    sum(
      reach.count[comp.name] * _instr_flops(comp, instr) for comp in comps.values() for instr in comp.instrs
    )
  )


__all__ = [
  "COLLECTIVE_OPS",
  "Collective",
  "ProgramStats",
  "parse_hlo",
  "program_stats",
  "flops_with_trip_counts",
]
