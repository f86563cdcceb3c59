"""What the ops' reverse-mode rules (`OpDef.vjp`) share: small builders of gradient
nodes, and reverse mode itself (`backprop`). A rule gets the graph being
differentiated, the forward node and one gradient (or None) per output, and appends
nodes with these; the pass is `tensorc.passes.autodiff`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import TensorcError
from ..types import TensorType, dim_product
from .registry import get_op

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


def backprop(g: Graph, nodes: list, grads: dict, needs: set) -> None:
    """Reverse mode over `nodes` (in forward order), appending the gradient nodes to
    `g`: `grads` maps values to their gradients (seeded with the outputs'), and gains
    one for each value in `needs` that the seeds reach."""
    for node in reversed(nodes):
        dys = [grads.get(v) for v in node.outputs]
        if all(d is None for d in dys) or not any(v in needs for v in node.inputs):
            continue
        rule = get_op(node.op).vjp
        if rule is None:
            raise TensorcError(f"grad: {node.where}: op {node.op} has no gradient rule")
        results = rule(g, node, dys)
        for x, dx in zip(node.inputs, results, strict=True):
            if x not in needs or dx is None:
                continue
            if isinstance(dx, NoGradient):
                raise TensorcError(f"grad: {node.where}: no gradient for {dx.what} "
                                   f"(%{x.name})")
            if dx.type != x.type:   # a rule's bug, caught where it happens
                raise TensorcError(f"grad: {node.where}: the rule gives {dx.type} for "
                                   f"%{x.name}: {x.type}")
            grads[x] = dx if x not in grads else g.add("add", grads[x], dx)


def through_decomposition(g: Graph, node, dys) -> list:
    """A rule for composite ops without one of their own (sparse and linear
    attention): the op's decomposition is built again in the backward and
    differentiated (what the backward then keeps is the decomposition's, e.g. a t x s
    matrix: fine for fine-tuning at training lengths, not for long sequences)."""
    start = len(g.nodes)
    outs = get_op(node.op).decompose(g, list(node.inputs), **node.attrs)
    inner = g.nodes[start:]
    local = {o: d for o, d in zip(outs, dys, strict=True) if d is not None}
    reach = set(node.inputs) | {v for n in inner for v in n.outputs}
    backprop(g, inner, local, reach)
    return [local.get(x) for x in node.inputs]
