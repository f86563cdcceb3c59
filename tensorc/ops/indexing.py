"""Selection and scatter ops that imported models need: topk (ONNX TopK) and scatter
(ScatterElements / ScatterND with their reductions; `scatter_add` in shape.py is its
gradient-only sibling)."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..types import TensorType
from . import vjp
from .registry import Attr, OpDef, norm_axis, numel, register
from .shape import _gather, _gather_ref


def _topk(x: TensorType, k: int, axis=-1, largest=True) -> list[TensorType]:
    if x.rank == 0:
        raise ShapeError(f"topk needs an axis to select along, got {x}")
    ax = norm_axis(axis, x.rank)
    n = x.shape[ax]
    if k < 0 or isinstance(n, int) and k > n:
        raise ShapeError(f"topk: k={k} is out of range for an axis of size {n} ({x})")
    shape = x.shape[:ax] + (k,) + x.shape[ax + 1:]
    return [TensorType(shape, x.dtype), TensorType(shape, "i64")]


def topk_order(x: np.ndarray, axis: int, largest: bool) -> np.ndarray:
    """The indices sorting x along `axis`, largest (or smallest) first, equal values in
    ascending index order (ONNX's rule): a stable argsort, of the reversed axis when
    largest (numpy sorts NaN as the largest value)."""
    if not largest:
        return np.argsort(x, axis=axis, kind="stable")
    n = x.shape[axis]
    order = np.argsort(np.flip(x, axis), axis=axis, kind="stable")
    return n - 1 - np.flip(order, axis)


def _topk_ref(x, k, axis=-1, largest=True):
    ax = axis % x.ndim
    idx = np.take(topk_order(x, ax, largest), np.arange(k), axis=ax)
    return np.take_along_axis(x, idx, ax), idx.astype(np.int64)


def _topk_vjp(g, node, dys):
    """dx[..., j, ...] = sum over t of dy[..., t, ...] where indices[..., t, ...] = j: the
    one-hot of the indices (k x n per row) times dy, summed over k."""
    (x,), (_, idx), (dy, _) = node.inputs, node.outputs, dys
    if dy is None:
        return [None]
    rank, ax = x.type.rank, node.attrs["axis"] % x.type.rank
    n = x.type.shape[ax]
    pos = g.add("reshape", g.add("range", start=(0,), limit=(n,)),
                shape=(n,) + (1,) * (rank - ax - 1))
    hit = g.add("equal", g.add("unsqueeze", idx, axes=(ax + 1,)), pos)
    spread = vjp.mask(g, hit, g.add("unsqueeze", dy, axes=(ax + 1,)))
    return [g.add("reduce_sum", spread, axes=(ax,), keepdims=False)]


register(OpDef(
    "topk", infer=_topk, reference=_topk_ref, kind="opaque",
    attrs={"k": Attr("int"), "axis": Attr("int", -1), "largest": Attr("bool", True)},
    flops=lambda outs, x, k, **attrs: numel(x) * max(k, 1), vjp=_topk_vjp,
    doc="the k largest (or smallest) values along `axis` and their indices, sorted, equal "
        "values lower index first (ONNX TopK with sorted=1)",
))


SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")


def _scatter(data: TensorType, idx: TensorType, updates: TensorType, axis: int = 0,
             reduction: str = "none") -> TensorType:
    want = _gather(data, idx, axis)
    if updates != want:
        raise ShapeError(f"updates {updates} should be {want}: what gather({data}, {idx}, "
                         f"axis={axis}) gives")
    return data


_UFUNCS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter_ref(data, idx, updates, axis=0, reduction="none"):
    _gather_ref(data, idx, axis)   # the same index check
    ax = axis % data.ndim
    out = np.array(data, copy=True)
    moved = np.moveaxis(out, ax, 0)   # a view: writes land in out
    upd = np.moveaxis(updates.reshape(data.shape[:ax] + (-1,) + data.shape[ax + 1:]), ax, 0)
    flat = np.asarray(idx).reshape(-1) % max(data.shape[ax], 1)
    if reduction != "none":
        _UFUNCS[reduction].at(moved, flat, upd)
    elif len(np.unique(flat)) == len(flat):
        moved[flat] = upd
    else:   # repeated indices: the last one wins (numpy's fancy assignment promises none)
        for j, i in enumerate(flat):
            moved[i] = upd[j]
    return out


def _scatter_vjp(g, node, dys):
    """none: dy where nothing was written, and dy at the written slices (exact for
    distinct indices; ONNX leaves repeated ones undefined); add: scatter_add's rule."""
    (data, idx, upd), (dy,) = node.inputs, dys
    red, axis = node.attrs["reduction"], node.attrs["axis"]
    if red in ("mul", "max", "min"):
        why = vjp.NoGradient(f"scatter with reduction={red}")
        return [why, None, why]
    d_upd = g.add("gather", dy, idx, axis=axis)
    if red == "add":
        return [dy, None, d_upd]
    ones = g.add("full", shape=upd.type.shape, value=1, dtype=dy.type.dtype)
    hit = g.add("scatter", vjp.zeros(g, data.type), idx, ones, axis=axis)
    return [g.add("mul", dy, g.add("sub", vjp.const(g, 1, dy.type.dtype), hit)), None, d_upd]


register(OpDef(
    "scatter", infer=_scatter, reference=_scatter_ref, inputs=(3, 3),
    attrs={"axis": Attr("int", 0), "reduction": Attr("str", "none", SCATTER_REDUCTIONS)},
    vjp=_scatter_vjp,
    flops=lambda outs, data, idx, updates, **attrs: int(np.prod(updates.shape)),
    doc="data with each slice of `updates` written at its index along `axis` (as gather "
        "reads them), or combined with what is there (add, mul, max, min); repeated "
        "indices apply in order (none: the last wins)",
))
