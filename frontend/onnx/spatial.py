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


# --- Resize: per resized axis, gathers of the input weighted by import-time constants --

def _nearest_coeffs(mode: str):
    def coeffs(r: float, scale: float) -> list:
        if float(r).is_integer():
            return [0, 1]
        up = {"round_prefer_floor": r > 0.5, "round_prefer_ceil": r >= 0.5, "floor": False,
              "ceil": True}[mode]
        return [1 - up, up]
    return coeffs


def _linear_coeffs(r: float, scale: float) -> list:
    return [1 - r, r]


def _linear_antialias(r: float, scale: float) -> np.ndarray:
    scale = min(scale, 1.0)
    start = int(np.floor(-1 / scale) + 1)
    c = np.clip(1 - np.abs((np.arange(start, 2 - start) - r) * scale), 0, 1)
    return c / c.sum()


def _cubic_coeffs(a: float, antialias: bool):
    def kernel(x):   # Keys' cubic convolution kernel with parameter a
        x = np.abs(x)
        return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(
            x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))

    def coeffs(r: float, scale: float) -> np.ndarray:
        if not antialias:
            return kernel(np.array([r + 1, r, 1 - r, 2 - r]))
        scale = min(scale, 1.0)
        start = int(np.floor(-2 / scale) + 1)
        c = kernel(scale * (np.arange(start, 2 - start) - r))
        return c / c.sum()
    return coeffs


def _source_coords(coord: str, n_in: int, n_out: int, scale: float, roi) -> np.ndarray:
    """Where each output position samples the input (ONNX's coordinate transformations)."""
    y, wide = np.arange(n_out, dtype=np.float64), scale * n_in
    if coord == "align_corners":
        return np.zeros(n_out) if wide == 1 else y * (n_in - 1) / (wide - 1)
    if coord == "asymmetric":
        return y / scale
    if coord == "tf_crop_and_resize":
        span = (roi[1] - roi[0]) * (n_in - 1)
        x = np.full(n_out, span / 2) if wide == 1 else y * span / (wide - 1)
        return x + roi[0] * (n_in - 1)
    if coord == "pytorch_half_pixel":
        return np.full(n_out, -0.5) if wide == 1 else (y + 0.5) / scale - 0.5
    if coord == "half_pixel":
        return (y + 0.5) / scale - 0.5
    offset = n_in / 2 * (1 - n_out / wide)   # half_pixel_symmetric
    return offset + (y + 0.5) / scale - 0.5


def _resize_taps(n_in: int, n_out: int, scale: float, coeffs, coord: str, roi,
                 exclude_outside: bool):
    """(indices [n_out, K], weights [n_out, K], outside [n_out] or None) of one axis: output
    j is the sum over k of input[indices[j, k]] * weights[j, k], or the extrapolation value
    where `outside` (tf_crop_and_resize). As ONNX's reference: the K taps nearest the
    source coordinate (ties to the lower ones), indices clamped into the input (edge
    padding), exclude_outside renormalising the weights of the taps inside it."""
    x = _source_coords(coord, n_in, n_out, scale, roi)
    base = np.floor(x)
    ratio = np.where(x == base, 1.0, x - base)
    w = np.array([coeffs(float(r), scale) for r in ratio], np.float64).reshape(n_out, -1)
    k = w.shape[1]
    pad = -(-k // 2)
    p = np.floor(x + pad)
    frac = x + pad - p
    if k % 2 == 0:
        start = p + np.where(frac == 0, -(k // 2), -(k // 2) + 1)
    else:
        start = p + np.where(frac <= 0.5, -((k - 1) // 2), -((k - 1) // 2) + 1)
    idx = start.astype(np.int64)[:, None] + np.arange(k) - pad
    if exclude_outside:
        w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    outside = (x < 0) | (x > n_in - 1) if coord == "tf_crop_and_resize" else None
    return np.clip(idx, 0, n_in - 1), w, outside if outside is not None and outside.any() \
        else None


def _resize_plan(n: OnnxNode, shape: list, rank: int):
    """(axes, per-axis scale, output size, roi pair) as ONNX's reference resolves scales
    or sizes, axes and keep_aspect_ratio_policy."""
    axes = n.attr("axes")
    axes = list(range(rank)) if axes is None else _check_axes(n, axes, rank)
    roi = n.consts(1, "roi") or None
    scales = n.consts(2, "scales") or None
    sizes = n.consts(3, "sizes") or None
    if (scales is None) == (sizes is None):
        raise ShapeError(f"{n.where}: needs exactly one of scales and sizes")
    given = scales if scales is not None else sizes
    if len(given) != len(axes) or roi is not None and len(roi) != 2 * len(axes):
        raise ShapeError(f"{n.where}: scales/sizes {given} and roi {roi} do not fit "
                         f"axes {axes}")
    dims = [shape[a] for a in axes]
    if scales is not None:   # a symbolic dim scaled by 1 stays itself
        dims = [1 if isinstance(d, str) and s == 1 else d for d, s in zip(dims, scales,
                                                                          strict=True)]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise n.unsupported(f"resized dims {dims} must be static and non-zero")
    if sizes is not None:
        if any(isinstance(s, str) or s < 0 for s in sizes):
            raise ShapeError(f"{n.where}: sizes {sizes} must be known non-negative ints")
        scale = [o / d for o, d in zip(sizes, dims, strict=True)]
        policy = n.attr("keep_aspect_ratio_policy", "stretch")
        if policy not in ("stretch", "not_larger", "not_smaller"):
            raise ShapeError(f"{n.where}: keep_aspect_ratio_policy {policy!r} is not ONNX's")
        if policy != "stretch":
            one = min(scale) if policy == "not_larger" else max(scale)
            scale = [one] * len(axes)
            sizes = [int(one * d + 0.5) for d in dims]
        out = list(sizes)
    else:
        scales = np.asarray(scales, np.float32)
        if (scales <= 0).any():
            raise ShapeError(f"{n.where}: scales {scales.tolist()} must be positive")
        out = [o if isinstance(d, int) else d for o, d in zip(
            (scales * np.array(dims)).astype(int).tolist(), [shape[a] for a in axes],
            strict=True)]
        scale = [float(s) for s in scales]
    pairs = [None] * len(axes) if roi is None else \
        [(float(roi[i]), float(roi[i + len(axes)])) for i in range(len(axes))]
    return axes, scale, out, pairs


def _resize(cx, n):
    """Resize (opset 13+): separable, one axis at a time in `axes` order, as ONNX's
    reference. An axis is K gathers of x at import-time indices, weighted by import-time
    coefficients and added (nearest: one gather); tf_crop_and_resize's positions outside
    the input take the extrapolation value (`where`). Modes nearest (every
    nearest_mode), linear and cubic (cubic_coeff_a, exclude_outside, antialias); every
    coordinate_transformation_mode; scales or sizes with keep_aspect_ratio_policy. The
    resized dims must be static; the others may be symbolic."""
    x = n.x(0)
    shape, dt = list(_shape(x)), _dtype(x)
    rank = len(shape)
    mode = n.attr("mode", "nearest")
    coord = n.attr("coordinate_transformation_mode", "half_pixel")
    antialias = bool(n.attr("antialias", 0)) and mode != "nearest"
    if mode == "nearest":
        coeffs = _nearest_coeffs(n.attr("nearest_mode", "round_prefer_floor"))
    elif mode == "linear":
        coeffs = _linear_antialias if antialias else _linear_coeffs
    elif mode == "cubic":
        coeffs = _cubic_coeffs(n.attr("cubic_coeff_a", -0.75), antialias)
    else:
        raise ShapeError(f"{n.where}: mode {mode!r} is not nearest, linear or cubic")
    if mode != "nearest" and dt not in ("f16", "f32", "f64"):
        raise n.unsupported(f"{mode} interpolation of {dt} (its rounding back is not "
                            "ONNX Runtime's)")
    wide = "f32" if dt == "f16" else dt
    y = cx.op("cast", x, dtype=wide) if wide != dt and mode != "nearest" else x
    extrap = _scalar(n.attr("extrapolation_value", 0.0), wide)
    for a, scale, out, roi in zip(*_resize_plan(n, shape, rank), strict=True):
        d = shape[a]
        if np.isclose(scale, 1.0) and out == d and (roi is None or np.isclose(roi[0], 0)
                                                     and np.isclose(roi[1], 1)):
            continue   # the identity along this axis
        idx, w, outside = _resize_taps(d, out, scale, coeffs, coord, roi or (0.0, 1.0),
                                       bool(n.attr("exclude_outside", 0)))
        tail = [1] * (rank - a - 1)
        if (np.count_nonzero(w, axis=1) == 1).all() and (w.max(axis=1) == 1).all():
            y = cx.op("gather", y, idx[np.arange(out), w.argmax(axis=1)], axis=a)
        else:
            acc = None
            for k in range(w.shape[1]):
                if not w[:, k].any():
                    continue
                part = cx.op("mul", cx.op("gather", y, idx[:, k], axis=a),
                             w[:, k].astype(_scalar(0, wide).dtype).reshape([out] + tail))
                acc = part if acc is None else cx.op("add", acc, part)
            y = acc
        if outside is not None:
            y = cx.op("where", outside.reshape([out] + tail), extrap, y)
    return [cx.op("cast", y, dtype=dt) if _dtype(y) != dt else y]


HANDLERS: dict[str, Callable[[_Importer, OnnxNode], list[Entry]]] = {
    "GlobalAveragePool": _global_pool("reduce_mean"), "GlobalMaxPool": _global_pool("reduce_max"),
    "MaxPool": _max_pool, "AveragePool": _average_pool, "Pad": _pad,
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm,
    "Resize": _resize,
}
