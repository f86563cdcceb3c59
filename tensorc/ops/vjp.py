"""What the ops' reverse-mode rules (`OpDef.vjp`) share: small builders of gradient
nodes. A rule gets the graph being differentiated, the forward node and one gradient
(or None) per output, and appends nodes with these; the driver is
`tensorc.passes.autodiff`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..types import TensorType, dim_product

if TYPE_CHECKING:
    from ..ir import Graph, Value


class NoGradient:
    """What a rule returns for an input it cannot differentiate (a rule returns None for
    an input whose gradient is zero); the driver raises, naming the node and `what`,
    when that gradient is needed."""

    def __init__(self, what: str):
        self.what = what


def const(g: Graph, value, dtype: str) -> Value:
    """A rank-0 constant of `dtype`."""
    return g.add_constant(g.fresh_name("grad.c"), np.array(value, TensorType((), dtype).np_dtype))


def scale(g: Graph, x: Value, c: float) -> Value:
    return g.add("mul", x, const(g, c, x.type.dtype))


def zeros(g: Graph, t: TensorType) -> Value:
    return g.add("full", shape=t.shape, value=0, dtype=t.dtype)


def mask(g: Graph, keep: Value, dy: Value) -> Value:
    """dy where `keep`, else 0."""
    return g.add("where", keep, dy, const(g, 0, dy.type.dtype))


def as_float(g: Graph, b: Value, dtype: str) -> Value:
    return g.add("cast", b, dtype=dtype)


def sum_to(g: Graph, dy: Value, t: TensorType) -> Value:
    """`dy` summed over the axes broadcasting added or stretched, so it has the shape
    `t` of the input that was broadcast (the transpose of broadcasting)."""
    shape = dy.type.shape
    lead = len(shape) - t.rank
    if lead:
        dy = g.add("reduce_sum", dy, axes=tuple(range(lead)), keepdims=False)
    stretched = tuple(i for i, (d, n) in enumerate(zip(t.shape, dy.type.shape, strict=True))
                      if d == 1 and n != 1)
    if stretched:
        dy = g.add("reduce_sum", dy, axes=stretched, keepdims=True)
    return dy


def unreduce(g: Graph, dy: Value, x: TensorType, axes, keepdims: bool) -> Value:
    """A reduction's output gradient broadcast back over the reduced axes of `x`."""
    axes = tuple(range(x.rank)) if axes is None else tuple(a % x.rank for a in axes)
    if not keepdims and axes:
        dy = g.add("unsqueeze", dy, axes=tuple(sorted(axes)))
    return dy if dy.type.shape == x.shape else g.add("expand", dy, shape=x.shape)


def count(g: Graph, dims, dtype: str) -> Value:
    """The number of elements over `dims` (which may be symbols) as a rank-0 float."""
    n = g.add("dims", values=(dim_product(tuple(dims)),), shape=(), dtype="i64")
    return g.add("cast", n, dtype=dtype)


def swap_last(g: Graph, x: Value) -> Value:
    perm = tuple(range(x.type.rank - 2)) + (x.type.rank - 1, x.type.rank - 2)
    return g.add("transpose", x, perm=perm)
