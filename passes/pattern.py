"""A small pattern language over the dataflow graph, in the spirit of TVM's dataflow
patterns and tinygrad's UPat. Patterns read like the math they match:

    x, s = Var("x"), Var("s")
    op.softmax(op.matmul(q, op.transpose(k)) * Scalar("scale") + mask)

- `Var("x")` matches any value and captures it as ``m["x"]``; a name used twice must
  match the same value both times.
- `Const("c", pred)` matches a value known to be constant (a graph constant, or
  computed from constants only) whose data satisfies `pred`; `Scalar(...)` is a
  constant whose elements are all one number (optionally ~= a given one).
- `op.NAME(*args, name=..., one_use=..., **attrs)` matches a node of that op whose
  inputs match `args` and whose attributes equal `attrs` (or satisfy them, when an
  attr is given as a predicate). Commutative ops (`OpDef.commutative`) also try
  their inputs swapped. `one_use=True` requires that the value has exactly one
  user and is not a graph output (so the rewrite does not duplicate work).
- `a | b` tries `a`, then `b`. Arithmetic operators build op patterns:
  ``x * 1.0`` is ``op.mul(x, Scalar(value=1.0))``.

A `Rule` pairs a pattern with a builder `build(m, b)` that returns the value to
replace the matched root with (or None to decline); see `tensorc.passes.rewrite`
for the driver and `docs/passes.md` for a walkthrough.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from tensorc.ir import Value
from tensorc.ops import get_op


class Match(dict):
    """Captured values by name, plus the graph facts (`ctx`) the match was made in."""

    def __init__(self, ctx, *args):
        super().__init__(*args)
        self.ctx = ctx

    def bind(self, name: str, v: Value) -> Match | None:
        """A copy with `name` bound to `v`, or None when it is bound to another value."""
        if name in self:
            return self if self[name] is v else None
        m = Match(self.ctx, self)
        m[name] = v
        return m

    def const(self, name: str) -> np.ndarray:
        """The data of a captured constant-valued value."""
        return self.ctx.constant(self[name])

    def attr(self, name: str, key: str):
        """Attribute `key` of the node that produced capture `name`."""
        return self[name].producer.attrs[key]


class Pat:
    """Base of all patterns: `match(value, m)` yields every extension of `m`."""

    def match(self, v: Value, m: Match) -> Iterator[Match]:
        raise NotImplementedError

    def __or__(self, other):
        return Alt(self, _pat(other))

    def __add__(self, other):
        return Op("add", self, _pat(other))

    def __radd__(self, other):
        return Op("add", _pat(other), self)

    def __sub__(self, other):
        return Op("sub", self, _pat(other))

    def __rsub__(self, other):
        return Op("sub", _pat(other), self)

    def __mul__(self, other):
        return Op("mul", self, _pat(other))

    def __rmul__(self, other):
        return Op("mul", _pat(other), self)

    def __truediv__(self, other):
        return Op("div", self, _pat(other))

    def __matmul__(self, other):
        return Op("matmul", self, _pat(other))


def _pat(x) -> Pat:
    return x if isinstance(x, Pat) else Scalar(value=x)


class Var(Pat):
    """Any value; `pred(value)` may narrow it (e.g. on its type)."""

    def __init__(self, name: str | None = None, pred: Callable[[Value], bool] | None = None):
        self.name, self.pred = name, pred

    def match(self, v, m):
        if self.pred is not None and not self.pred(v):
            return
        m = m.bind(self.name, v) if self.name else m
        if m is not None:
            yield m


class Const(Pat):
    """A value whose data is known at compile time and satisfies `pred(data)`."""

    def __init__(self, name: str | None = None, pred: Callable[[np.ndarray], bool] | None = None):
        self.name, self.pred = name, pred

    def match(self, v, m):
        data = m.ctx.constant(v)
        if data is None or (self.pred is not None and not self.pred(data)):
            return
        m = m.bind(self.name, v) if self.name else m
        if m is not None:
            yield m


def all_equal(data: np.ndarray) -> float | None:
    """The one number every element of `data` holds, or None."""
    if data.size == 0 or data.dtype == np.bool_:
        return None
    first = data.reshape(-1)[0]
    return float(first) if np.all(data == first) else None


def approx(a: float, b: float, rel: float = 1e-4) -> bool:
    return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def Scalar(name: str | None = None, value: float | None = None,
           pred: Callable[[float], bool] | None = None, rel: float = 1e-4) -> Const:
    """A constant whose elements are all one number: ~= `value` if given (relative
    tolerance `rel`, since exporters round 1/sqrt(d) differently), satisfying `pred`."""
    def ok(data):
        x = all_equal(data)
        return x is not None and (value is None or approx(x, value, rel)) \
            and (pred is None or pred(x))
    return Const(name, ok)


class Alt(Pat):
    def __init__(self, *alts: Pat):
        self.alts = alts

    def match(self, v, m):
        for a in self.alts:
            yield from a.match(v, m)


class Op(Pat):
    """A node of op `op` (a name or a tuple of names) with inputs matching `args`."""

    def __init__(self, op: str | tuple[str, ...], *args: Pat, name: str | None = None,
                 one_use: bool = False, **attrs):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.args = tuple(_pat(a) for a in args)
        self.name, self.one_use, self.attrs = name, one_use, attrs
        self.commutative = len(self.args) == 2 and all(get_op(o).commutative for o in self.ops)

    def match(self, v, m):
        node = v.producer
        if node is None or node.op not in self.ops or len(node.inputs) != len(self.args):
            return
        if self.one_use and not m.ctx.one_use(v):
            return
        for key, want in self.attrs.items():
            have = node.attrs.get(key)
            if not (want(have) if callable(want) else have == want):
                return
        if self.name:
            m = m.bind(self.name, v)
            if m is None:
                return
        orders = [node.inputs]
        if self.commutative and node.inputs[0] is not node.inputs[1]:
            orders.append(node.inputs[::-1])
        for ins in orders:
            yield from _match_all(self.args, ins, m)


def _match_all(pats, values, m) -> Iterator[Match]:
    if not pats:
        yield m
        return
    for m1 in pats[0].match(values[0], m):
        yield from _match_all(pats[1:], values[1:], m1)


class _OpNamespace:
    """`op.softmax(x, axis=-1)` is `Op("softmax", x, axis=-1)`."""

    def __getattr__(self, name: str) -> Callable[..., Op]:
        get_op(name)  # an unknown op name fails here, where the rule is written
        return lambda *args, **kw: Op(name, *args, **kw)


op = _OpNamespace()


@dataclass
class Rule:
    """`pattern` -> whatever `build(match, builder)` returns (None declines)."""

    name: str
    pattern: Pat
    build: Callable
    doc: str = ""


def rule(pattern: Pat, name: str | None = None):
    """Decorator: ``@rule(x * 1.0)`` over ``def mul_one(m, b): return m["x"]``."""
    def deco(fn) -> Rule:
        return Rule(name or fn.__name__.replace("_", "-"), pattern, fn, (fn.__doc__ or "").strip())
    return deco
