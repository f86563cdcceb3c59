"""Ops that move or select data without arithmetic: reshape, transpose, concat,
split, slice, expand, squeeze/unsqueeze, gather, full, trilu."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError, TensorcError
from ..types import Dim, TensorType, dim_divide, dim_product
from . import vjp
from .registry import Attr, OpDef, broadcast_shapes, norm_axis, register, same_dtype

# Slice ends at or beyond this mean "to the end" (ONNX exporters write INT64_MAX).
SLICE_END = 2**31 - 1


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _reshape(t: TensorType, shape) -> TensorType:
    shape = list(shape)
    if shape.count(-1) > 1 or any(isinstance(d, int) and d < -1 for d in shape):
        raise ShapeError(f"bad target shape {_fmt(shape)}: at most one -1, no other negatives")
    if -1 in shape:
        rest = dim_divide(t.numel, dim_product([d for d in shape if d != -1]))
        if rest is None:
            raise ShapeError(f"cannot reshape {t} to {_fmt(shape)}")
        shape[shape.index(-1)] = rest
    if dim_product(shape) != t.numel:
        raise ShapeError(f"cannot reshape {t} to {_fmt(shape)}: element counts differ")
    return TensorType(tuple(shape), t.dtype)


def _reshape_back(g, node, dys):
    """reshape, squeeze, unsqueeze: the gradient takes the input's shape back."""
    (x,), (dy,) = node.inputs, dys
    return [g.add("reshape", dy, shape=x.type.shape)]


register(OpDef("reshape", infer=_reshape, reference=lambda x, shape: x.reshape(shape),
               attrs={"shape": Attr("dims")}, kind="shape", vjp=_reshape_back))


def _transpose(t: TensorType, perm=None) -> TensorType:
    perm = tuple(reversed(range(t.rank))) if perm is None else perm
    if sorted(perm) != list(range(t.rank)):
        raise ShapeError(f"perm {list(perm)} is not a permutation of the {t.rank} axes of {t}")
    return TensorType(tuple(t.shape[p] for p in perm), t.dtype)


def _transpose_vjp(g, node, dys):
    (dy,), rank = dys, node.inputs[0].type.rank
    perm = node.attrs["perm"] or tuple(reversed(range(rank)))
    return [g.add("transpose", dy, perm=tuple(int(i) for i in np.argsort(perm)))]


register(OpDef("transpose", infer=_transpose,
               reference=lambda x, perm=None: np.transpose(x, perm),
               attrs={"perm": Attr("ints", None)}, kind="shape", vjp=_transpose_vjp))


def _concat(*ts: TensorType, axis: int) -> TensorType:
    same_dtype(*ts)
    if len({t.rank for t in ts}) > 1:
        raise ShapeError("ranks differ: " + ", ".join(str(t) for t in ts))
    ax = norm_axis(axis, ts[0].rank)
    for i in range(ts[0].rank):
        if i != ax and len({t.shape[i] for t in ts}) > 1:
            raise ShapeError(f"dims other than axis {axis} differ: " +
                             ", ".join(str(t) for t in ts))
    parts = [t.shape[ax] for t in ts]
    if not all(isinstance(p, int) for p in parts):
        if sum(p != 0 for p in parts) > 1:
            raise ShapeError("concat along a symbolic dim is not supported: " +
                             ", ".join(str(t) for t in ts))
        total = next(p for p in parts if p != 0)
    else:
        total = sum(parts)
    shape = list(ts[0].shape)
    shape[ax] = total
    return TensorType(tuple(shape), ts[0].dtype)


def _concat_vjp(g, node, dys):
    (dy,), xs = dys, node.inputs
    ax = norm_axis(node.attrs["axis"], dy.type.rank)
    parts = [x.type.shape[ax] for x in xs]
    if len(xs) == 1:
        return [dy]
    if all(isinstance(p, int) for p in parts):
        return g.add_node("split", [dy], {"axis": ax, "sizes": parts})
    # one symbolic part, the others empty (what concat's inference allows)
    return [dy if p != 0 else vjp.zeros(g, x.type) for x, p in zip(xs, parts, strict=True)]


register(OpDef("concat", infer=_concat, inputs=(1, None), kind="shape", vjp=_concat_vjp,
               reference=lambda *xs, axis: np.concatenate(xs, axis=axis),
               attrs={"axis": Attr("int")}))


def _split(t: TensorType, axis: int, sizes) -> list[TensorType]:
    ax = norm_axis(axis, t.rank)
    if isinstance(t.shape[ax], int) and sum(sizes) != t.shape[ax]:
        raise ShapeError(f"sizes {list(sizes)} do not add up to dim {ax} of {t}")
    out = []
    for s in sizes:
        shape = list(t.shape)
        shape[ax] = s
        out.append(TensorType(tuple(shape), t.dtype))
    return out


def _split_ref(x, axis, sizes):
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _split_vjp(g, node, dys):
    parts = [dy if dy is not None else vjp.zeros(g, y.type)
             for dy, y in zip(dys, node.outputs, strict=True)]
    return [g.add("concat", *parts, axis=node.attrs["axis"])]


register(OpDef("split", infer=_split, reference=_split_ref, kind="shape", vjp=_split_vjp,
               attrs={"axis": Attr("int"), "sizes": Attr("ints")}))


def _slice_dim(d: Dim, start: Dim, end: Dim, step: int) -> Dim:
    if isinstance(end, int) and end >= SLICE_END:
        end = d if step > 0 else end
    if isinstance(d, int) and isinstance(start, int) and isinstance(end, int):
        return len(range(*slice(start, end, step).indices(d)))
    if step == 1 and start == 0 and end == d:
        return d
    if step == 1 and start == 0 and isinstance(d, int) and isinstance(end, str):
        return end  # a prefix of symbolic length; the backend checks it fits at run time
    if step == 1 and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end:
        return end - start  # a fixed window of a symbolic dim
    raise ShapeError(f"cannot slice symbolic dim {d} by [{start}:{end}:{step}]")


def _slice(t: TensorType, starts, ends, axes=None, steps=None) -> TensorType:
    axes = tuple(range(len(starts))) if axes is None else axes
    steps = (1,) * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ShapeError("starts, ends, axes and steps must have equal lengths")
    if 0 in steps:
        raise ShapeError("slice step cannot be 0")
    if len({norm_axis(a, t.rank) for a in axes}) != len(axes):
        raise ShapeError(f"slice axes {list(axes)} name an axis twice (rank {t.rank})")
    shape = list(t.shape)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = norm_axis(a, t.rank)
        shape[a] = _slice_dim(shape[a], s, e, st)
    return TensorType(tuple(shape), t.dtype)


def _slice_ref(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = (1,) * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _unslice_axis(g, dy, ax: int, n: Dim, start: int, step: int):
    """The transpose of taking [start::step] (length dy's dim) of an axis of size n:
    position i of the result reads dy[(i - start) / step] where that is a whole
    in-range index, else 0 (gather and where, so every backend runs it natively)."""
    i64 = "i64"
    rel = g.add("sub", g.add("range", start=(0,), limit=(n,), dtype=i64),
                vjp.const(g, start, i64))
    if step < 0:
        rel = g.add("neg", rel)
    q = g.add("div", rel, vjp.const(g, abs(step), i64))
    length = g.add("dims", values=(dy.type.shape[ax],), shape=(), dtype=i64)
    valid = g.add("logical_and", g.add("greater_equal", rel, vjp.const(g, 0, i64)),
                  g.add("less", q, length))
    if abs(step) != 1:
        valid = g.add("logical_and", valid,
                      g.add("equal", g.add("mul", q, vjp.const(g, abs(step), i64)), rel))
    picked = g.add("gather", dy, g.add("where", valid, q, vjp.const(g, 0, i64)), axis=ax)
    rank = dy.type.rank
    valid = g.add("reshape", valid, shape=(1,) * ax + (n,) + (1,) * (rank - ax - 1))
    return vjp.mask(g, valid, picked)


def _slice_vjp(g, node, dys):
    (x,), (dy,), a = node.inputs, dys, node.attrs
    axes = a["axes"] if a["axes"] is not None else tuple(range(len(a["starts"])))
    steps = a["steps"] or (1,) * len(axes)
    for start, end, ax, step in zip(a["starts"], a["ends"], axes, steps, strict=True):
        ax = norm_axis(ax, x.type.rank)
        n = x.type.shape[ax]
        if isinstance(n, int) and isinstance(start, int) and isinstance(end, int):
            start, _, step = slice(start, min(end, SLICE_END), step).indices(n)
        elif not isinstance(start, int):
            raise ShapeError(f"{node.where}: no gradient for a slice starting at {start}")
        if dy.type.shape[ax] == 0:   # an empty slice: nothing flows back
            return [vjp.zeros(g, x.type)]
        if dy.type.shape[ax] != n:
            dy = _unslice_axis(g, dy, ax, n, start, step)
    return [dy]


register(OpDef("slice", infer=_slice, reference=_slice_ref, kind="shape", vjp=_slice_vjp,
               attrs={"starts": Attr("dims"), "ends": Attr("dims"),
                      "axes": Attr("ints", None), "steps": Attr("ints", None)}))


def _expand(t: TensorType, shape) -> TensorType:
    return TensorType(broadcast_shapes(t, TensorType(tuple(shape), t.dtype)), t.dtype)


register(OpDef("expand", infer=_expand, kind="shape",
               reference=lambda x, shape: np.broadcast_to(x, np.broadcast_shapes(x.shape, shape)),
               attrs={"shape": Attr("dims")}, doc="numpy-style broadcast to a shape",
               vjp=lambda g, node, dys: [vjp.sum_to(g, dys[0], node.inputs[0].type)]))


def _squeeze(t: TensorType, axes) -> TensorType:
    if len({norm_axis(a, t.rank) for a in axes}) != len(axes):
        raise ShapeError(f"squeeze axes {list(axes)} name an axis twice (rank {t.rank})")
    axes = {norm_axis(a, t.rank) for a in axes}
    if any(t.shape[a] != 1 for a in axes):
        raise ShapeError(f"cannot squeeze axes {sorted(axes)} of {t}: not all of size 1")
    return TensorType(tuple(d for i, d in enumerate(t.shape) if i not in axes), t.dtype)


def _unsqueeze(t: TensorType, axes) -> TensorType:
    rank = t.rank + len(axes)
    axes = sorted(norm_axis(a, rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise ShapeError(f"unsqueeze axes name an axis twice (rank {rank}): {axes}")
    shape = list(t.shape)
    for a in axes:
        shape.insert(a, 1)
    return TensorType(tuple(shape), t.dtype)


register(OpDef("squeeze", infer=_squeeze, kind="shape", attrs={"axes": Attr("ints")},
               reference=lambda x, axes: np.squeeze(x, tuple(axes)), vjp=_reshape_back))
register(OpDef("unsqueeze", infer=_unsqueeze, kind="shape", attrs={"axes": Attr("ints")},
               vjp=_reshape_back,
               reference=lambda x, axes: np.expand_dims(
                   x, tuple(sorted(a % (x.ndim + len(axes)) for a in axes)))))


def _gather(data: TensorType, idx: TensorType, axis: int = 0) -> TensorType:
    if idx.dtype not in ("i32", "i64"):
        raise ShapeError(f"indices must be i32 or i64, got {idx} (data {data})")
    ax = norm_axis(axis, data.rank)
    return TensorType(data.shape[:ax] + idx.shape + data.shape[ax + 1:], data.dtype)


def _gather_ref(data, idx, axis=0):
    n = data.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = idx.max() if idx.max() >= n else idx.min()
        raise TensorcError(f"gather: index {bad} is out of range for an axis of size {n}")
    return np.take(data, idx, axis=axis)


def _gather_vjp(g, node, dys):
    (data, idx), (dy,) = node.inputs, dys
    return [g.add("scatter_add", vjp.zeros(g, data.type), idx, dy, axis=node.attrs["axis"]),
            None]


register(OpDef("gather", infer=_gather, reference=_gather_ref, inputs=(2, 2), kind="opaque",
               attrs={"axis": Attr("int", 0)}, doc="np.take(data, indices, axis)",
               vjp=_gather_vjp))


def _scatter_add(data: TensorType, idx: TensorType, updates: TensorType, axis: int = 0
                 ) -> TensorType:
    want = _gather(data, idx, axis)
    if updates != want:
        raise ShapeError(f"updates {updates} should be {want}: what gather({data}, {idx}, "
                         f"axis={axis}) gives")
    return data


def _scatter_add_ref(data, idx, updates, axis=0):
    _gather_ref(data, idx, axis)   # the same index check
    ax = axis % data.ndim
    out = np.array(data, copy=True)
    moved = np.moveaxis(out, ax, 0)   # a view: adds land in out
    upd = np.moveaxis(updates.reshape(data.shape[:ax] + (-1,) + data.shape[ax + 1:]), ax, 0)
    np.add.at(moved, np.asarray(idx).reshape(-1), upd)
    return out


def _scatter_add_vjp(g, node, dys):
    idx, (dy,) = node.inputs[1], dys
    return [dy, None, g.add("gather", dy, idx, axis=node.attrs["axis"])]


register(OpDef(
    "scatter_add", infer=_scatter_add, reference=_scatter_add_ref, inputs=(3, 3),
    attrs={"axis": Attr("int", 0)}, vjp=_scatter_add_vjp,
    flops=lambda outs, data, idx, updates, **attrs: int(np.prod(updates.shape)),
    doc="data with each slice of `updates` added at its index along `axis` (repeated "
        "indices add up): the transpose of gather, how an embedding's gradient is formed",
))

register(OpDef(
    "full", inputs=(0, 0), kind="shape",
    infer=lambda shape, value, dtype: TensorType(tuple(shape), dtype),
    reference=lambda shape, value, dtype: np.full(shape, value, TensorType((), dtype).np_dtype),
    attrs={"shape": Attr("dims"), "value": Attr("scalar"), "dtype": Attr("dtype", "f32")},
    doc="a tensor of one repeated value (ONNX ConstantOfShape)",
))


def _trilu(t: TensorType, upper=False, k=0) -> TensorType:
    if t.rank < 2:
        raise ShapeError(f"needs rank >= 2, got {t}")
    return t


register(OpDef("trilu", infer=_trilu, kind="shape",
               vjp=lambda g, node, dys: [g.add("trilu", dys[0], **node.attrs)],
               reference=lambda x, upper=False, k=0: np.triu(x, k) if upper else np.tril(x, k),
               attrs={"upper": Attr("bool", False), "k": Attr("int", 0)},
               doc="keep the lower (or upper) triangle of the last two axes"))


def _tensor_scatter(cache: TensorType, update: TensorType, index: TensorType, axis=-2
                    ) -> TensorType:
    if cache.dtype != update.dtype or cache.rank != update.rank or cache.rank < 2:
        raise ShapeError(f"cache {cache} and update {update} need one dtype and one rank >= 2")
    ax = norm_axis(axis, cache.rank)
    if ax == 0:
        raise ShapeError("the write axis cannot be axis 0, the batch axis")
    if any(c != u for i, (c, u) in enumerate(zip(cache.shape, update.shape, strict=True))
           if i != ax):
        raise ShapeError(f"update {update} must match cache {cache} on every axis but {ax}")
    if index.dtype not in ("i32", "i64") or index.shape != cache.shape[:1]:
        raise ShapeError(f"write indices must be i32/i64 [{cache.shape[0]}] (one per batch "
                         f"row of {cache}), got {index}")
    n, t = cache.shape[ax], update.shape[ax]
    if isinstance(n, int) and isinstance(t, int) and t > n:
        raise ShapeError(f"update {update} has more rows than cache {cache} on axis {ax}")
    return cache


def tensor_scatter_bounds(cache_rows: int, update_rows: int) -> tuple[int, int]:
    """Write indices must lie in [lo, hi): the update's rows fit inside the cache."""
    return 0, cache_rows - update_rows + 1


def _tensor_scatter_ref(cache, update, index, axis=-2):
    ax = norm_axis(axis, cache.ndim)
    lo, hi = tensor_scatter_bounds(cache.shape[ax], update.shape[ax])
    out = cache.copy()
    for b, start in enumerate(np.asarray(index).tolist()):
        if not lo <= start < hi:
            raise TensorcError(f"tensor_scatter: write index {start} (batch row {b}) does not "
                               f"leave room for {update.shape[ax]} rows in an axis of "
                               f"{cache.shape[ax]}")
        rows = [slice(None)] * cache.ndim
        rows[0], rows[ax] = b, slice(start, start + update.shape[ax])
        out[tuple(rows)] = update[b]
    return out


def _tensor_scatter_vjp(g, node, dys):
    """Row j of the result came from update row j - index[b] where that is in range, else
    from the cache: a one-hot [b, t, n] of the written rows routes the gradient."""
    (cache, update, index), (dy,) = node.inputs, dys
    rank, dt = cache.type.rank, cache.type.dtype
    ax = norm_axis(node.attrs["axis"], rank)
    t, n = update.type.shape[ax], cache.type.shape[ax]
    rows = g.add("add", g.add("unsqueeze", g.add("cast", index, dtype="i64"), axes=(1,)),
                 g.add("range", start=(0,), limit=(t,)))
    hot = vjp.as_float(g, g.add("equal", g.add("unsqueeze", rows, axes=(2,)),
                                g.add("range", start=(0,), limit=(n,))), dt)   # [b, t, n]
    b = cache.type.shape[0]
    written = g.add("reshape", g.add("reduce_sum", hot, axes=(1,)),
                    shape=(b,) + (1,) * (ax - 1) + (n,) + (1,) * (rank - ax - 1))
    dcache = g.add("mul", dy, g.add("sub", vjp.const(g, 1, dt), written))
    perm = [i for i in range(rank) if i != ax]
    perm.insert(rank - 2, ax)                        # the written axis next to last
    moved = g.add("transpose", dy, perm=tuple(perm)) if ax != rank - 2 else dy
    hot = g.add("reshape", hot, shape=(b,) + (1,) * (rank - 3) + (t, n))
    dupdate = g.add("matmul", hot, moved)
    if ax != rank - 2:
        dupdate = g.add("transpose", dupdate, perm=tuple(int(i) for i in np.argsort(perm)))
    return [dcache, dupdate, None]


register(OpDef(
    "tensor_scatter", infer=_tensor_scatter, reference=_tensor_scatter_ref, inputs=(3, 3),
    vjp=_tensor_scatter_vjp,
    attrs={"axis": Attr("int", -2)},
    doc="the cache with `update` written at rows index[b].. of `axis` in each batch row b "
        "(ONNX TensorScatter, linear mode): how a key/value cache takes a step's rows. "
        "On llvm a caller may donate a cache that is a graph input (pass it back as the "
        "result's out): the rows are then written in place, with no copy of the cache",
))
