"""The ONNX handlers of the ops over images' and audio's spatial dims: global and
windowed pooling (GlobalAveragePool, GlobalMaxPool, MaxPool, AveragePool), Pad, and
InstanceNormalization / GroupNormalization, each written with existing IR ops (strided
slices, concat, reductions), so every backend runs generated code. The importer's table
is `handlers.HANDLERS` with these."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tensorc.errors import ShapeError
from tensorc.ir import TensorType
from tensorc.ops.shape import SLICE_END

from .handlers import _check_axes, _scalar, _shape
from .values import Entry, _dtype

if TYPE_CHECKING:
    from .importer import OnnxNode, _Importer


def _global_pool(op):
    def h(cx, n):
        x = n.x(0)
        rank = len(_shape(x))
        if rank < 3:
            raise ShapeError(f"{n.where}: input {list(_shape(x))} needs rank >= 3 (N, C, ...)")
        return [cx.op(op, x, axes=list(range(2, rank)), keepdims=True)]
    return h


def _pad_part(cx, mode: str, x: Entry, a: int, size: int, front: bool, value) -> Entry | None:
    """What Pad puts before (front) or after axis a of x: `size` elements."""
    if not size:
        return None
    shape = list(_shape(x))
    d, grown = shape[a], shape[:a] + [size] + shape[a + 1:]
    if mode == "constant":
        return cx.op("full", shape=grown, value=value, dtype=_dtype(x))
    if mode == "edge":
        edge = cx.op("slice", x, starts=[0 if front else d - 1], ends=[1 if front else d],
                     axes=[a])
        return cx.op("expand", edge, shape=grown)
    if mode == "wrap":
        return cx.op("slice", x, starts=[d - size if front else 0],
                     ends=[d if front else size], axes=[a])
    # reflect: x[size], ..., x[1] before; x[d-2], ..., x[d-1-size] after
    start, end = (size, 0) if front else (d - 2, d - 2 - size)
    return cx.op("slice", x, starts=[start], ends=[end if end >= 0 else -SLICE_END],
                 axes=[a], steps=[-1])


def _pad(cx, n):
    """Pad (opset 11+: pads, constant value and axes as inputs known at import): each
    axis is cropped by a slice (negative pads), then grown by a concat of a `full`
    (constant), of slices of the input (reflect: negative steps; wrap) or of its edge
    expanded (edge)."""
    x = n.x(0)
    shape, dt = list(_shape(x)), _dtype(x)
    rank = len(shape)
    mode = n.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise n.unsupported(f"mode {mode!r} is not supported (constant, reflect, edge, wrap)")
    pads = n.consts(1, "pads")
    axes = n.consts(3, "axes")
    axes = list(range(rank)) if axes is None else _check_axes(n, axes, rank)
    if pads is None or len(pads) != 2 * len(axes) or any(isinstance(p, str) for p in pads):
        raise ShapeError(f"{n.where}: pads {pads} should be {2 * len(axes)} integers "
                         f"(begin and end for axes {axes})")
    value = n.const(2, "constant_value", 0) if n.has(2) else 0
    value = TensorType((), dt).np_dtype.type(value).item()
    for i, a in enumerate(axes):
        b, e = pads[i], pads[i + len(axes)]
        if b < 0 or e < 0:
            d = shape[a]
            if not isinstance(d, int):
                raise n.unsupported(f"negative pads on symbolic dim {d}")
            if -min(b, 0) - min(e, 0) > d:
                raise ShapeError(f"{n.where}: pads {b}, {e} crop more than dim {d}")
            x = cx.op("slice", x, starts=[max(-b, 0)], ends=[d + min(e, 0)], axes=[a])
            shape = list(_shape(x))
            b, e = max(b, 0), max(e, 0)
        if not b and not e:
            continue
        d = shape[a]
        if not isinstance(d, int):
            raise n.unsupported(f"padding symbolic dim {d} (axis {a}) is not supported")
        if mode == "reflect" and max(b, e) > d - 1:
            raise ShapeError(f"{n.where}: reflect pads {b}, {e} need dim {d} > each pad")
        if mode in ("edge", "wrap") and d == 0 or mode == "wrap" and max(b, e) > d:
            raise ShapeError(f"{n.where}: {mode} pads {b}, {e} do not fit dim {d}")

        parts = [_pad_part(cx, mode, x, a, size, front, value)
                 for size, front in ((b, True), (e, False))]
        parts = [p for p in (parts[0], x, parts[1]) if p is not None]
        x = cx.op("concat", *parts, axis=a)
        shape = list(_shape(x))
    return [x]


def _pool_geometry(n: OnnxNode, x: Entry):
    """(kernel, strides, dilations, pads, extra, out) of a MaxPool/AveragePool, per
    spatial axis, as ONNX Runtime computes them: pads are [begin..., end...] (auto_pad
    resolved), extra is what ceil_mode adds after the end pad so the last partial window
    exists (a window that would start in the end padding is dropped), out the output
    size. The spatial dims must be static."""
    shape = list(_shape(x))
    sd = len(shape) - 2
    if sd not in (1, 2, 3):
        raise n.unsupported(f"input {shape} should be [N, C, ...] with 1 to 3 spatial dims")
    dims = shape[2:]
    if not all(isinstance(d, int) for d in dims):
        raise n.unsupported(f"needs static spatial dims, got {dims}")
    kernel = n.attr("kernel_shape")
    strides, dil = n.attr("strides", [1] * sd), n.attr("dilations", [1] * sd)
    pads = list(n.attr("pads", [0] * 2 * sd))
    for name, vals, size, least in (("kernel_shape", kernel, sd, 1), ("strides", strides, sd, 1),
                                    ("dilations", dil, sd, 1), ("pads", pads, 2 * sd, 0)):
        if vals is None or len(vals) != size or any(v < least for v in vals):
            raise ShapeError(f"{n.where}: {name} {vals} should be {size} values "
                             f"{'> 0' if least else '>= 0'} (ONNX)")
    auto, ceil = n.attr("auto_pad", "NOTSET"), n.attr("ceil_mode", 0)
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ShapeError(f"{n.where}: auto_pad {auto!r} is not an ONNX mode")
    out, extra = [], []
    for i, d in enumerate(dims):
        span = (kernel[i] - 1) * dil[i] + 1
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            if dil[i] != 1:   # ORT and ONNX's reference pad for the undilated kernel
                raise n.unsupported(f"auto_pad {auto} with dilations {dil}: ONNX's spec "
                                    "and ONNX Runtime disagree on the padding")
            o = -(-d // strides[i])
            total = (o - 1) * strides[i] + span - d
            if total < -1 and n.type == "AveragePool" and auto == "SAME_UPPER":
                # ORT's head pad is then negative: its windows shift (MaxPool's do not)
                raise n.unsupported(f"auto_pad {auto} with stride {strides[i]} over a "
                                    f"{span}-wide window skips cells of dim {d} (negative "
                                    "padding) is not supported")
            total = max(total, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + sd] = (small, big) if auto == "SAME_UPPER" else (big, small)
        else:
            if auto == "VALID":
                pads[i] = pads[i + sd] = 0
            room = d + pads[i] + pads[i + sd] - span
            o = (-(-room // strides[i]) if ceil else room // strides[i]) + 1
            if ceil and (o - 1) * strides[i] >= d + pads[i]:
                o -= 1
        if o <= 0:
            raise ShapeError(f"{n.where}: kernel {kernel} (dilations {dil}) does not fit "
                             f"the padded input {shape}")
        out.append(o)
        extra.append(max((o - 1) * strides[i] + span - d - pads[i] - pads[i + sd], 0))
    return kernel, strides, dil, pads, extra, out


def _pool_windows(cx, x: Entry, kernel, strides, dil, out) -> list[Entry]:
    """The kernel's strided slices of the padded x: one per kernel offset, each the
    output's shape (offset dilation * index, step the stride)."""
    sd = len(kernel)
    axes = list(range(2, 2 + sd))
    wins = []
    for idx in itertools.product(*(range(k) for k in kernel)):
        starts = [j * dl for j, dl in zip(idx, dil, strict=True)]
        ends = [s0 + st * (o - 1) + 1 for s0, st, o in zip(starts, strides, out, strict=True)]
        wins.append(cx.op("slice", x, starts=starts, ends=ends, axes=axes, steps=list(strides)))
    return wins


def _pool_pad(cx, x: Entry, before, after, value) -> Entry:
    for i, (b, e) in enumerate(zip(before, after, strict=True)):
        parts = [_pad_part(cx, "constant", x, 2 + i, size, front, value)
                 for size, front in ((b, True), (e, False))]
        parts = [p for p in (parts[0], x, parts[1]) if p is not None]
        x = cx.op("concat", *parts, axis=2 + i) if len(parts) > 1 else x
    return x


def _max_pool(cx, n):
    """MaxPool: x padded with -inf (an integer type's minimum) by concat with `full`,
    then `maximum` over the kernel's strided slices. Padded cells never win, so the
    ceil_mode extra cells need no special care."""
    x = n.x(0)
    if len([o for o in n.outputs if o]) > 1:
        raise n.unsupported("the Indices output is not supported")
    if n.attr("storage_order", 0) not in (0, 1):
        raise ShapeError(f"{n.where}: storage_order should be 0 or 1")
    kernel, strides, dil, pads, extra, out = _pool_geometry(n, x)
    sd, dt = len(kernel), _dtype(x)
    np_dt = TensorType((), dt).np_dtype
    if dt == "bool":
        raise n.unsupported("a bool input (ONNX allows numeric types only)")
    low = -np.inf if np_dt.kind == "f" else np.iinfo(np_dt).min
    xp = _pool_pad(cx, x, pads[:sd], [e + x2 for e, x2 in zip(pads[sd:], extra, strict=True)],
                   TensorType((), dt).np_dtype.type(low).item())
    wins = _pool_windows(cx, xp, kernel, strides, dil, out)
    y = wins[0]
    for w in wins[1:]:
        y = cx.op("maximum", y, w)
    return [y]


def _average_pool(cx, n):
    """AveragePool: the sum of the kernel's strided slices of the zero-padded x, divided
    by each window's count: with count_include_pad=1 the cells inside the input and its
    pads (not ceil_mode's extra), else the input's cells only. The counts are the same
    slices of a ones-mask, computed at import (a scalar when they are all equal)."""
    x = n.x(0)
    dt = _dtype(x)
    if dt not in ("f16", "f32", "f64"):
        raise n.unsupported(f"dtype {dt} (ONNX allows float types only)")
    kernel, strides, dil, pads, extra, out = _pool_geometry(n, x)
    sd, dims = len(kernel), list(_shape(x))[2:]
    include = n.attr("count_include_pad", 0)
    ends = [e + x2 for e, x2 in zip(pads[sd:], extra, strict=True)]
    xp = _pool_pad(cx, x, pads[:sd], ends, 0.0)
    wins = _pool_windows(cx, xp, kernel, strides, dil, out)
    y = wins[0]
    for w in wins[1:]:
        y = cx.op("add", y, w)
    # the count per output position, from a padded mask sliced the same way
    mask = np.ones(dims, np.int64)
    if include:
        mask = np.pad(mask, [(b, e) for b, e in zip(pads[:sd], pads[sd:], strict=True)],
                      constant_values=1)
        mask = np.pad(mask, [(0, e) for e in extra], constant_values=0)
    else:
        mask = np.pad(mask, [(b, e) for b, e in zip(pads[:sd], ends, strict=True)],
                      constant_values=0)
    count = np.zeros(out, np.int64)
    for idx in itertools.product(*(range(k) for k in kernel)):
        sl = tuple(slice(j * dl, j * dl + st * (o - 1) + 1, st)
                   for j, dl, st, o in zip(idx, dil, strides, out, strict=True))
        count += mask[sl]
    count = np.maximum(count, 1).astype(TensorType((), dt).np_dtype)
    if (count == count.flat[0]).all():
        return [cx.op("div", y, _scalar(count.flat[0], dt))]
    return [cx.op("div", y, count.reshape([1, 1] + out))]


def _normalize(cx, x, axes, eps):
    mean = cx.op("reduce_mean", x, axes=axes, keepdims=True)
    dev = cx.op("sub", x, mean)
    var = cx.op("reduce_mean", cx.op("mul", dev, dev), axes=axes, keepdims=True)
    return cx.op("mul", dev, cx.op("rsqrt", cx.op("add", var, _scalar(eps, _dtype(x)))))


def _per_channel(cx, n, p, rank, c, what):
    if list(_shape(p)) != [c]:
        raise ShapeError(f"{n.where}: {what} has shape {list(_shape(p))}; it should be [{c}]")
    return cx.op("reshape", p, shape=[c] + [1] * (rank - 2))


def _instance_norm(cx, n):
    x, scale, bias = n.x(0), n.x(1), n.x(2)
    shape = _shape(x)
    rank = len(shape)
    if rank < 3:
        raise ShapeError(f"{n.where}: input {list(shape)} needs rank >= 3 (N, C, ...)")
    y = _normalize(cx, x, list(range(2, rank)), n.attr("epsilon", 1e-5))
    y = cx.op("mul", y, _per_channel(cx, n, scale, rank, shape[1], "scale"))
    return [cx.op("add", y, _per_channel(cx, n, bias, rank, shape[1], "bias"))]


def _group_norm(cx, n):
    """GroupNormalization: x as [N, G, C/G, ...], normalised over all but N and G; the
    affine is per channel (opset 21) or per group (opset 18). stash_type=1 (the default)
    computes an f16 input in f32."""
    x, scale, bias = n.x(0), n.x(1), n.x(2)
    shape, dt = list(_shape(x)), _dtype(x)
    rank, g = len(shape), n.attr("num_groups")
    if rank < 3 or not isinstance(shape[1], int) or g is None or g <= 0 or shape[1] % g:
        raise ShapeError(f"{n.where}: input {shape} needs rank >= 3 and a static channel "
                         f"count divisible by num_groups={g}")
    c = shape[1]
    wide = "f32" if dt == "f16" and n.attr("stash_type", 1) == 1 else dt
    xw = cx.op("cast", x, dtype=wide) if wide != dt else x
    grouped = cx.op("reshape", xw, shape=[shape[0], g, c // g] + shape[2:])
    y = _normalize(cx, grouped, list(range(2, rank + 1)), n.attr("epsilon", 1e-5))
    if cx.opset < 21:   # scale and bias per group
        y = cx.op("mul", y, _per_channel(cx, n, scale, rank + 1, g, "scale"))
        y = cx.op("add", y, _per_channel(cx, n, bias, rank + 1, g, "bias"))
        y = cx.op("reshape", y, shape=shape)
        return [cx.op("cast", y, dtype=dt) if wide != dt else y]
    y = cx.op("reshape", y, shape=shape)
    y = cx.op("cast", y, dtype=dt) if wide != dt else y
    y = cx.op("mul", y, _per_channel(cx, n, scale, rank, c, "scale"))
    return [cx.op("add", y, _per_channel(cx, n, bias, rank, c, "bias"))]


HANDLERS: dict[str, Callable[[_Importer, OnnxNode], list[Entry]]] = {
    "GlobalAveragePool": _global_pool("reduce_mean"), "GlobalMaxPool": _global_pool("reduce_max"),
    "MaxPool": _max_pool, "AveragePool": _average_pool, "Pad": _pad,
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm,
}
