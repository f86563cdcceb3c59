"""Lazy values: expressions over a value's multi-index whose leaves are strided reads
(`Access`) or affine functions of the index (`Index`). View ops only rewrite the
leaves' coefficients, so transposes, reshapes, slices and broadcasts cost nothing
until a kernel reads them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tensorc.errors import TensorcError

from .. import kernel_ir as K
from .program import Buf, View


@dataclass(frozen=True, eq=False)
class Access(K.Expr):
    """Lowering-time leaf: buf[offset + sum(i_d * coefs[d])] over a value's index."""
    buf: Buf
    offset: int
    coefs: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.buf.dtype


@dataclass(frozen=True, eq=False)
class Index(K.Expr):
    """Lowering-time leaf: the integer offset + sum(i_d * coefs[d])."""
    offset: int
    coefs: tuple[int, ...]
    dtype: str = "i64"



@dataclass(frozen=True, eq=False)
class Lazy:
    shape: tuple[int, ...]
    expr: K.Expr

    @property
    def dtype(self) -> str:
        return self.expr.dtype


def contiguous(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def is_contiguous(e: K.Expr, shape) -> bool:
    """Whether `e` is a plain row-major read of a whole buffer (size-1 dims ignored)."""
    return isinstance(e, Access) and e.offset == 0 and all(
        c == s for c, s, d in zip(e.coefs, contiguous(shape), shape, strict=True) if d != 1)


def map_leaves(e: K.Expr, fn) -> K.Expr:
    """Rebuild `e` with fn(leaf) for every Access/Index leaf."""
    if isinstance(e, (Access, Index)):
        return fn(e)
    if isinstance(e, (K.Const, K.Var)):
        return e
    if isinstance(e, K.Unary):
        return K.Unary(e.op, map_leaves(e.x, fn))
    if isinstance(e, K.Binary):
        return K.Binary(e.op, map_leaves(e.a, fn), map_leaves(e.b, fn))
    if isinstance(e, K.Select):
        return K.Select(map_leaves(e.cond, fn), map_leaves(e.a, fn), map_leaves(e.b, fn))
    if isinstance(e, K.Cast):
        return K.Cast(map_leaves(e.x, fn), e.dtype)
    raise TypeError(f"unexpected expression {e!r}")


def leaves(e: K.Expr) -> list:
    out = []
    map_leaves(e, lambda leaf: out.append(leaf) or leaf)
    return out


def compute_count(e: K.Expr) -> int:
    """Arithmetic nodes that read memory: what recomputing `e` would cost."""
    if isinstance(e, (Access, Index, K.Const)):
        return 0
    kids = [getattr(e, a) for a in ("x", "a", "b", "cond") if hasattr(e, a)]
    return sum(compute_count(k) for k in kids) + any(
        isinstance(leaf, Access) for k in kids for leaf in leaves(k))


def affine_map(lazy: Lazy, shape, rows) -> Lazy:
    """A view: index i_old[p] = base[p] + sum_s A[p][s] * i_new[s], rows[p] = (base, A_row)."""
    def fn(leaf):
        off = leaf.offset + sum(c * base for c, (base, _) in zip(leaf.coefs, rows, strict=True))
        coefs = tuple(sum(c * row[s] for c, (_, row) in zip(leaf.coefs, rows, strict=True))
                      for s in range(len(shape)))
        return type(leaf)(leaf.buf, off, coefs) if isinstance(leaf, Access) \
            else Index(off, coefs, leaf.dtype)
    return Lazy(tuple(shape), map_leaves(lazy.expr, fn))


def broadcast_to(lazy: Lazy, shape) -> Lazy:
    if lazy.shape == tuple(shape):
        return lazy
    pad = len(shape) - len(lazy.shape)
    rows = []
    for p, d in enumerate(lazy.shape):
        row = [0] * len(shape)
        if d != 1:
            row[p + pad] = 1
        rows.append((0, row))
    return affine_map(lazy, shape, rows)


def transpose(lazy: Lazy, perm) -> Lazy:
    shape = [lazy.shape[p] for p in perm]
    rows = [None] * len(perm)
    for s, p in enumerate(perm):
        rows[p] = (0, [int(s == t) for t in range(len(perm))])
    return affine_map(lazy, shape, rows)


def reshape(lazy: Lazy, shape) -> Lazy | None:
    """Reshape by rewriting strides, or None if some leaf is not linear over a merged
    group of dims (then the caller materialises first)."""
    old, new = list(lazy.shape), list(shape)
    if 0 in old:  # no element is ever read
        zeros = (0,) * len(new)
        return Lazy(tuple(new), map_leaves(lazy.expr, lambda leaf: Access(
            leaf.buf, leaf.offset, zeros) if isinstance(leaf, Access) else Index(
            leaf.offset, zeros, leaf.dtype)))
    groups, i, j = [], 0, 0   # (old dims, new dims) with equal products
    while i < len(old) or j < len(new):
        gi, gj, po, pn = [], [], 1, 1
        while True:
            if po <= pn and i < len(old) and (po < pn or not gi or old[i] == 1):
                po *= old[i]
                gi.append(i)
                i += 1
            elif j < len(new) and (pn < po or not gj or new[j] == 1):
                pn *= new[j]
                gj.append(j)
                j += 1
            else:
                break
            if po == pn and (i == len(old) or old[i] != 1) and (j == len(new) or new[j] != 1):
                break
        if po != pn:
            raise TensorcError(f"cannot reshape {old} to {new}")
        groups.append((gi, gj))

    def fn(leaf):
        coefs = [0] * len(new)
        for gi, gj in groups:
            live = [p for p in gi if old[p] != 1]
            for a, b in zip(live, live[1:], strict=False):
                if leaf.coefs[a] != leaf.coefs[b] * old[b]:
                    raise _NotLinear
            unit = leaf.coefs[live[-1]] if live else 0
            for q in reversed(gj):
                coefs[q] = unit if new[q] != 1 else 0
                unit *= new[q]
        if isinstance(leaf, Access):
            return Access(leaf.buf, leaf.offset, tuple(coefs))
        return Index(leaf.offset, tuple(coefs), leaf.dtype)
    try:
        return Lazy(tuple(new), map_leaves(lazy.expr, fn))
    except _NotLinear:
        return None


class _NotLinear(Exception):
    pass


def covers(lazy: Lazy, view: View) -> bool:
    """Whether `lazy` is all of `view`'s (contiguous) buffer, in order."""
    return is_contiguous(lazy.expr, lazy.shape) and lazy.expr.buf is view.buf and \
        math.prod(lazy.shape) == math.prod(view.shape)


def constant(data, dtype: str, name: str = "") -> Lazy:
    """A lazy read of constant data (a graph weight, or values fixed per shape). np.require
    keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)."""
    data = np.require(data, requirements="C")
    b = Buf(data.nbytes, dtype, "const", data, name)
    return Lazy(data.shape, Access(b, 0, contiguous(data.shape)))
