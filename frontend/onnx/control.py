"""ONNX control flow imported into tensorc's flat IR: `If` and `Loop`, whose bodies are
subgraphs, are imported inline (`_Importer.subgraph`: the body's formal inputs bound,
names of the enclosing graphs visible, its own names local to it).

- If with a condition known at import (a constant, or folded from shapes): the taken
  branch only. With a condition computed at run time: both branches, their outputs
  combined by `where(cond, then, else)`, which needs each pair to have one shape and
  dtype. Both branches then run (as in a select): fine for the small branches exporters
  write, and it never reads a branch's value where the other was taken.
- Loop with a trip count and a start condition known at import, and a condition output
  that is a constant, or folds (no data-dependent early exit): unrolled, at most
  `MAX_UNROLL` iterations; the scan outputs are the iterations' values stacked on a new
  axis 0. A trip count or start condition computed from graph inputs is a
  `NeedsConstantError` naming them (a caller that knows them can bind them).

Anything else is one `UnsupportedOpError` line naming what.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tensorc.errors import ShapeError
from tensorc.ir import Value

from .handlers import _shape
from .values import Entry, NeedsConstantError, Sym, _clean, _dtype

if TYPE_CHECKING:
    import onnx

    from .importer import OnnxNode, _Importer

MAX_UNROLL = 1024  # Loop iterations tensorc unrolls at import


def _known_bool(e: Entry) -> bool | None:
    """A condition's value when known at import, else None."""
    if isinstance(e, Value):
        return None
    arr = np.asarray(e.dims if isinstance(e, Sym) else e).reshape(-1)
    if arr.size != 1:
        raise ShapeError(f"a condition has {arr.size} elements; ONNX needs one")
    return None if isinstance(arr[0], str) else bool(arr[0])  # a symbol: known per call


def _scope(n: OnnxNode, what: str) -> tuple[str, str]:
    """Where errors inside the subgraph point, and the prefix of its value names."""
    return f"{n.where} > {what} > ", f"{_clean(n.proto.name or n.type)}.{_clean(what)}."


def _if(cx: _Importer, n: OnnxNode) -> list[Entry]:
    cond = n.x(0)
    branches = {k: n.attrs[k] for k in ("then_branch", "else_branch")}
    taken = _known_bool(cond)
    if taken is not None:
        key = "then_branch" if taken else "else_branch"
        return cx.subgraph(branches[key], {}, *_scope(n, key))
    then, other = (cx.subgraph(g, {}, *_scope(n, k)) for k, g in branches.items())
    if len(then) != len(other):
        raise ShapeError(f"{n.where}: the branches have {len(then)} and {len(other)} "
                         "outputs")
    c = cx.op("reshape", cond, shape=[])
    outs = []
    for k, (a, b) in enumerate(zip(then, other, strict=True)):
        if list(_shape(a)) != list(_shape(b)) or _dtype(a) != _dtype(b):
            raise n.unsupported(
                f"If with a condition computed at run time whose branches give output {k} "
                f"different types ({_dtype(a)}{list(_shape(a))} and "
                f"{_dtype(b)}{list(_shape(b))}): tensorc combines both with `where`")
        outs.append(cx.op("where", c, a, b))
    return outs


def _needs_known(cx: _Importer, n: OnnxNode, k: int, what: str) -> Entry:
    e = n.x(k)
    if isinstance(e, Value):
        src = cx.graph_inputs_of(e)
        raise NeedsConstantError(
            f"{n.where}: Loop with a {what} computed at run time"
            f"{' from graph input ' + ', '.join(map(repr, src)) if src else ''}; tensorc "
            "unrolls loops at import and needs it known there", src)
    return e


def _loop(cx: _Importer, n: OnnxNode) -> list[Entry]:
    body: onnx.GraphProto = n.attrs["body"]
    trips = None
    if n.has(0):
        e = _needs_known(cx, n, 0, "trip count")
        trips = np.asarray(e.dims if isinstance(e, Sym) else e).reshape(-1)[0]
        if isinstance(trips, str):
            raise n.unsupported(f"Loop with the symbolic trip count {trips!r}: tensorc "
                                "unrolls loops at import and needs a number")
        trips = int(trips)
    cond = _known_bool(_needs_known(cx, n, 1, "start condition")) if n.has(1) else True
    if cond is None:
        raise n.unsupported("Loop with a start condition that depends on a symbolic dim")
    if trips is None and not n.has(1):
        raise n.unsupported("Loop with neither a trip count nor a condition (endless)")
    carried = [n.x(k) for k in range(2, len(n.inputs))]
    formal = [vi.name for vi in body.input]
    n_scan = len(body.output) - 1 - len(carried)
    if len(formal) != 2 + len(carried) or n_scan < 0:
        raise ShapeError(f"{n.where}: the body has {len(formal)} inputs and "
                         f"{len(body.output)} outputs for {len(carried)} loop-carried values")
    scans: list[list[Entry]] = [[] for _ in range(n_scan)]
    i = 0
    while cond and (trips is None or i < trips):
        if i == MAX_UNROLL:
            raise n.unsupported(
                f"Loop of more than {MAX_UNROLL} iterations (trip count "
                f"{trips if trips is not None else 'none, the condition never turns false'}"
                f"): tensorc unrolls loops at import, at most {MAX_UNROLL} iterations")
        bind = dict(zip(formal, [np.asarray(i, np.int64), np.asarray(cond), *carried],
                        strict=True))
        outs = cx.subgraph(body, bind, *_scope(n, f"body{i}"))
        cond = _known_bool(outs[0])
        if cond is None:
            raise n.unsupported("Loop with a condition computed from the data (a "
                                "data-dependent early exit)")
        carried = outs[1:1 + len(carried)]
        for s, v in zip(scans, outs[1 + len(carried):], strict=True):
            s.append(cx.op("unsqueeze", v, axes=[0]))
        i += 1
    if scans and i == 0:
        raise n.unsupported("Loop with scan outputs that runs no iteration (their "
                            "shape is unknown)")
    return carried + [cx.op("concat", *s, axis=0) if len(s) > 1 else s[0] for s in scans]


HANDLERS: dict[str, Callable[[_Importer, OnnxNode], list[Entry]]] = {
    "If": _if, "Loop": _loop,
}
