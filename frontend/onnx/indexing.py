"""The ONNX handlers of selection, scatter and rearrangement ops: TopK, ScatterElements,
ScatterND, NonZero, ReduceProd, CumProd, Hardmax, DepthToSpace and SpaceToDepth. TopK,
the scatters and ReduceProd map onto the IR's `topk`, `scatter` and `reduce_prod`; the
rest are compositions of existing IR ops. The importer's table is `handlers.HANDLERS`
with these."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tensorc.errors import ShapeError
from tensorc.ir import Value, dim_product

from .handlers import _check_axes, _dim, _elements_index, _reduce, _scalar, _shape, _wrapped
from .values import Entry, NeedsConstantError, Sym, _dtype

if TYPE_CHECKING:
    from .importer import OnnxNode, _Importer


def _topk(cx, n):
    """TopK: the IR's `topk` (sorted, equal values lower index first; sorted=0 allows any
    order, so sorted is a valid answer too). K must be known at import."""
    x, k = n.x(0), n.const(1, "K")
    if isinstance(k, str):
        raise n.unsupported(f"K {k!r} must be a number known at import")
    rank = len(_shape(x))
    axis = _check_axes(n, [n.attr("axis", -1)], rank)[0]
    d = _shape(x)[axis]
    if k < 0 or isinstance(d, int) and k > d:
        raise ShapeError(f"{n.where}: K={k} is out of range for axis {axis} of size {d}")
    return cx.op_multi("topk", x, k=int(k), axis=axis, largest=bool(n.attr("largest", 1)))


def _reduction(n: OnnxNode) -> str:
    red = n.attr("reduction", "none")
    if red not in ("none", "add", "mul", "max", "min"):
        raise ShapeError(f"{n.where}: reduction {red!r} is not an ONNX reduction (none, add, "
                         "mul, max, min)")
    return red


def _scatter_elements(cx, n):
    """ScatterElements as `scatter` on the flattened data at linear indices: the index
    gives the coordinate along `axis`, every other coordinate is the update's own
    position (a range), as GatherElements reads them."""
    data, idx, upd = n.x(0), n.x(1), n.x(2)
    shape, ishape = _shape(data), _shape(idx)
    rank = len(shape)
    axis = _check_axes(n, [n.attr("axis", 0)], rank)[0]
    if list(_shape(upd)) != list(ishape) or len(ishape) != rank:
        raise ShapeError(f"{n.where}: updates {list(_shape(upd))} and indices "
                         f"{list(ishape)} need one shape of the data's rank {rank}")
    lin = _elements_index(cx, idx, shape, axis)
    lin = cx.op("expand", lin, shape=list(ishape)) if list(_shape(lin)) != list(ishape) else lin
    flat = cx.op("reshape", data, shape=[dim_product(shape)])
    y = cx.op("scatter", flat, lin, upd, axis=0, reduction=_reduction(n))
    return [cx.op("reshape", y, shape=list(shape))]


def _scatter_nd(cx, n):
    """ScatterND as `scatter` on the data's first k dims flattened (k: the indices' last
    dim), at linear indices computed from each index tuple."""
    data, idx, upd = n.x(0), n.x(1), n.x(2)
    shape, ishape = _shape(data), _shape(idx)
    k = ishape[-1] if ishape else None
    if not isinstance(k, int) or k > len(shape):
        raise ShapeError(f"{n.where}: indices {list(ishape)} need a static last dim of at "
                         f"most the data's rank {len(shape)}")
    want = list(ishape[:-1]) + list(shape[k:])
    if list(_shape(upd)) != want:
        raise ShapeError(f"{n.where}: updates have shape {list(_shape(upd))}; ONNX needs "
                         f"{want}")
    flat = cx.op("reshape", data, shape=[dim_product(shape[:k])] + list(shape[k:]))
    lin = None
    for i in range(k):
        part = cx.op("squeeze", cx.op("slice", idx, starts=[i], ends=[i + 1],
                                      axes=[len(ishape) - 1]), axes=[len(ishape) - 1])
        stride = dim_product(shape[i + 1:k])
        part = _wrapped(cx, part, shape[i])
        part = cx.op("mul", part, _dim(stride, "i64")) if stride != 1 else part
        lin = part if lin is None else cx.op("add", lin, part)
    y = cx.op("scatter", flat, lin, upd, axis=0, reduction=_reduction(n))
    return [cx.op("reshape", y, shape=list(shape))]


def _nonzero(cx, n):
    """NonZero: its output's shape depends on its input's values, which the IR's types
    cannot say, so the input must be known at import (a constant, or bound by the caller:
    `from_model(bind=...)`, which the conformance tests do); the indices are then a
    constant."""
    x = n.x(0)
    if isinstance(x, Value):
        src = [v.name for v in cx.graph.inputs if v is x]
        raise NeedsConstantError(
            f"{n.where}: its output's shape depends on the values of input {n.inputs[0]!r}, "
            f"which is computed at run time{' (graph input ' + repr(src[0]) + ')' if src else ''}"
            "; tensorc needs it known at import", src)
    arr = np.asarray([d != 0 for d in x.dims.flat]).reshape(x.dims.shape) \
        if isinstance(x, Sym) else np.asarray(x)
    return [np.array(np.nonzero(arr), np.int64).reshape(arr.ndim, -1)]


def _cumprod(cx, n):
    """CumProd as `reduce_prod` of x repeated n times under an n x n triangular mask (1
    where an element is left out): y[j] = prod over i of where(mask[j, i], x[i], 1).
    O(n^2), as CumSum's matmul; exact for zeros and negatives."""
    x = n.x(0)
    rank, dt = len(_shape(x)), _dtype(x)
    axis = _check_axes(n, [n.const(1, "axis")], rank)[0]
    d = _shape(x)[axis]
    rev, excl = n.attr("reverse", 0), n.attr("exclusive", 0)
    # keep[j, i]: forward i <= j (lower), reverse i >= j (upper); exclusive drops i = j
    keep = cx.op("trilu", cx.op("full", shape=[d, d], value=True, dtype="bool"), upper=bool(rev),
                 k=((1 if rev else -1) if excl else 0))
    perm = [i for i in range(rank) if i != axis] + [axis]
    xt = cx.op("transpose", x, perm=perm) if axis != rank - 1 else x
    picked = cx.op("where", keep, cx.op("unsqueeze", xt, axes=[rank - 1]), _scalar(1, dt))
    y = cx.op("reduce_prod", picked, axes=[rank], keepdims=False)
    back = [perm.index(i) for i in range(rank)]
    return [cx.op("transpose", y, perm=back) if axis != rank - 1 else y]


def _hardmax(cx, n):
    """Hardmax (opset 13): 1 at the first maximum along `axis`, 0 elsewhere: `argmax`
    compared with a range, cast to x's type."""
    x = n.x(0)
    rank, dt = len(_shape(x)), _dtype(x)
    axis = _check_axes(n, [n.attr("axis", -1)], rank)[0]
    d = _shape(x)[axis]
    pos = cx.op("reshape", cx.op("range", start=[0], limit=[d]),
                shape=[d] + [1] * (rank - axis - 1))
    hit = cx.op("equal", cx.op("argmax", x, axis=axis, keepdims=True), pos)
    return [cx.op("cast", hit, dtype=dt)]


def _block_geometry(n: OnnxNode, x: Entry):
    shape = list(_shape(x))
    b = n.attr("blocksize")
    if len(shape) != 4 or b is None or b <= 0:
        raise ShapeError(f"{n.where}: needs a [N, C, H, W] input and a positive blocksize, "
                         f"got {shape} and {b}")
    mode = n.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise ShapeError(f"{n.where}: mode {mode!r} should be DCR or CRD")
    return shape, b, mode


def _depth_to_space(cx, n):
    """DepthToSpace: reshape, transpose, reshape. DCR: the depth splits as [b, b, C'];
    CRD: as [C', b, b]."""
    x = n.x(0)
    (nb, c, h, w), b, mode = _block_geometry(n, x)
    if not isinstance(c, int) or c % (b * b):
        raise ShapeError(f"{n.where}: channels {c} must be a multiple of blocksize^2 = {b * b}")
    cc = c // (b * b)
    if mode == "DCR":
        y = cx.op("reshape", x, shape=[nb, b, b, cc, h, w])
        y = cx.op("transpose", y, perm=[0, 3, 4, 1, 5, 2])
    else:
        y = cx.op("reshape", x, shape=[nb, cc, b, b, h, w])
        y = cx.op("transpose", y, perm=[0, 1, 4, 2, 5, 3])
    return [cx.op("reshape", y, shape=[nb, cc, dim_product([h, b]), dim_product([w, b])])]


def _space_to_depth(cx, n):
    """SpaceToDepth, DepthToSpace's inverse: [N, C, H/b, b, W/b, b] transposed so the
    blocks lead the depth (DCR, the default) or follow each channel (CRD, opset 28)."""
    x = n.x(0)
    (nb, c, h, w), b, mode = _block_geometry(n, x)
    if not all(isinstance(d, int) and d % b == 0 for d in (h, w)):
        raise ShapeError(f"{n.where}: spatial dims {h}, {w} must be multiples of blocksize {b}")
    y = cx.op("reshape", x, shape=[nb, c, h // b, b, w // b, b])
    perm = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    y = cx.op("transpose", y, perm=perm)
    return [cx.op("reshape", y, shape=[nb, dim_product([c, b * b]), h // b, w // b])]


HANDLERS: dict[str, Callable[[_Importer, OnnxNode], list[Entry]]] = {
    "TopK": _topk, "ScatterElements": _scatter_elements, "ScatterND": _scatter_nd,
    "NonZero": _nonzero, "ReduceProd": _reduce("reduce_prod"), "CumProd": _cumprod,
    "Hardmax": _hardmax, "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
}
