"""The text form of a graph, in the spirit of jaxpr / MLIR::

    graph tiny(%x: f32[batch,4]) {
      %w: f32[4,4] = const
      %s: f32[] = const 0.5
      %0: f32[batch,4] = matmul(%x, %w)
      %1: f32[batch,4] = mul(%0, %s)
      return %1
    }

Constants with at most `INLINE_MAX` elements carry their data inline; larger ones
are declared and their data travels beside the text (see `tensorc.artifact`).
Attributes equal to their default are left out. print -> parse -> print is the
identity.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .errors import ParseError, TensorcError
from .ir import Graph, TensorType, Value
from .printer import (  # noqa: F401  (print and parse are one text form)
    INLINE_MAX,
    _fmt_scalar,
    format_constant,
    format_graph,
    format_node,
)

# --- parsing -------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<value>%[\w.]+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<punct>->|[()\[\]{},:=])
  | (?P<atom>[\w.*+\-]+)
""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str):
        self.toks: list[tuple[str, str, int]] = []
        pos, line = 0, 1
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ParseError(f"line {line}: unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.toks.append((m.lastgroup, m.group(), line))
            line += m.group().count("\n")
            pos = m.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def line(self) -> int:
        return self.toks[min(self.i, len(self.toks) - 1)][2] if self.toks else 1

    def next(self, kind: str | None = None, text: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise ParseError(f"line {self.line()}: unexpected end of text, expected "
                             f"{text or kind}")
        k, t, line = self.toks[self.i]
        if (kind and k != kind) or (text and t != text):
            raise ParseError(f"line {line}: expected {text or kind}, got {t!r}")
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        if self.peek() == text:
            self.i += 1
            return True
        return False


def parse_scalar(tok: str):
    """A literal as the text form writes it: true/false, an int, a float (inf, nan),
    else the word itself (a symbolic dim, a dtype). Also used for CLI values."""
    if tok in ("true", "false"):
        return tok == "true"
    if tok in ("inf", "-inf", "nan"):
        return float(tok)
    if re.fullmatch(r"-?\d+", tok):
        if len(tok) > 40:   # Python refuses to parse ints past 4300 digits; no dim needs 40
            raise ParseError(f"the number {tok[:12]}... has {len(tok)} digits: too large")
        return int(tok)
    try:
        return float(tok)
    except ValueError:
        return tok  # a symbolic dim or a bare word such as a dtype


def _literal(ts: _Tokens):
    if ts.accept("["):
        items = []
        while not ts.accept("]"):
            items.append(_literal(ts))
            if ts.peek() != "]":
                ts.next(text=",")
        return tuple(items)
    kind, tok, _ = ts.toks[ts.i] if ts.i < len(ts.toks) else (None, None, 0)
    if kind == "string":
        ts.i += 1
        return json.loads(tok)
    if tok == "graph":
        return _graph(ts)
    line = ts.line()
    try:
        return parse_scalar(ts.next("atom"))
    except ParseError as e:
        raise ParseError(f"line {line}: {e}") from None


def _type(ts: _Tokens) -> TensorType:
    dtype = ts.next("atom")
    dims = _literal(ts)
    if not isinstance(dims, tuple):
        raise ParseError(f"line {ts.line()}: expected a shape after {dtype}")
    bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, int | str)]
    if bad:
        raise ParseError(f"line {ts.line()}: dim {bad[0]!r} of {dtype} is neither an "
                         "integer nor a name")
    try:
        return TensorType(dims, dtype)
    except TensorcError as e:  # unknown dtype, negative dim
        raise ParseError(f"line {ts.line()}: {e}") from None


def parse_graph(text: str) -> Graph:
    """Parse the text form back into a `Graph` (large constants come without data)."""
    ts = _Tokens(text)
    try:
        g = _graph(ts)
    except RecursionError:
        raise ParseError(f"line {ts.line()}: brackets or graphs nested too deeply") from None
    if ts.peek() is not None:
        raise ParseError(f"line {ts.line()}: unexpected text after the graph")
    return g


def _graph(ts: _Tokens) -> Graph:
    """One `graph name(...) { ... }`, at top level or nested as an attribute."""
    ts.next(text="graph")
    g = Graph(ts.next("atom"))
    scope: dict[str, Value] = {}

    def define(name: str) -> str:
        if name in scope:
            raise ParseError(f"line {ts.line()}: %{name} is defined twice")
        return name

    def use(tok: str) -> Value:  # called just after `tok` was read
        try:
            return scope[tok[1:]]
        except KeyError:
            line = ts.toks[ts.i - 1][2]
            raise ParseError(f"line {line}: {tok} is used before it is defined") from None

    ts.next(text="(")
    while not ts.accept(")"):
        name = define(ts.next("value")[1:])
        ts.next(text=":")
        scope[name] = g.add_input(name, _type(ts))
        ts.accept(",")
    ts.next(text="{")
    while not ts.accept("return"):
        line = ts.line()
        outs: list[tuple[str, TensorType]] = []
        while True:
            name = define(ts.next("value")[1:])
            ts.next(text=":")
            outs.append((name, _type(ts)))
            if not ts.accept(","):
                break
        ts.next(text="=")
        op = ts.next("atom")
        if op == "const":
            if len(outs) != 1:
                raise ParseError(f"line {line}: a const defines one value, not {len(outs)}")
            (name, t), = outs
            data = None
            if ts.peek() not in ("return",) and not str(ts.peek()).startswith("%"):
                lit = _literal(ts)
                try:
                    data = np.array(lit, dtype=t.np_dtype).reshape(
                        tuple(int(d) for d in t.shape))
                except (ValueError, TypeError, OverflowError):
                    raise ParseError(f"line {line}: the data of %{name} does not fit "
                                     f"{t}") from None
            scope[name] = g.add_constant(name, data, t)
            continue
        ts.next(text="(")
        inputs, attrs = [], {}
        while not ts.accept(")"):
            if str(ts.peek()).startswith("%"):
                inputs.append(use(ts.next("value")))
            else:
                key = ts.next("atom")
                ts.next(text="=")
                attrs[key] = _literal(ts)
            ts.accept(",")
        try:
            results = g.add_node(op, inputs, attrs, names=[n for n, _ in outs])
        except ParseError:
            raise
        except Exception as e:  # unknown op, bad attrs, types that do not infer
            raise ParseError(f"line {line}: {e}") from None
        for (name, t), v in zip(outs, results, strict=True):
            if v.type != t:
                raise ParseError(f"line {line}: %{name} is declared {t} but {op} gives {v.type}")
            scope[name] = v
    g.outputs = [use(ts.next("value"))]
    while ts.accept(","):
        g.outputs.append(use(ts.next("value")))
    ts.next(text="}")
    return g
