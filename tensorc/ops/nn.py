"""Contractions, reductions and normalisations: matmul, reduce_*, argmax, softmax,
layer_norm, conv2d."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..types import FLOAT_DTYPES, TensorType
from .registry import (
    Attr,
    OpDef,
    broadcast_shapes,
    elementwise_flops,
    norm_axis,
    numel,
    register,
    same_dtype,
)


def _matmul(a: TensorType, b: TensorType) -> TensorType:
    same_dtype(a, b)
    if a.rank == 0 or b.rank == 0:
        raise ShapeError(f"cannot matmul a scalar: {a} @ {b}")
    a2 = a.shape if a.rank > 1 else (1,) + a.shape
    b2 = b.shape if b.rank > 1 else b.shape + (1,)
    if a2[-1] != b2[-2]:
        raise ShapeError(f"inner dims differ: {a} @ {b}")
    batch = broadcast_shapes(TensorType(a2[:-2]), TensorType(b2[:-2]))
    shape = batch + (a2[-2],) * (a.rank > 1) + (b2[-1],) * (b.rank > 1)
    return TensorType(shape, a.dtype)


def _matmul_flops(outs, a, b):
    return 2 * numel(outs[0]) * a.shape[-1]


register(OpDef("matmul", infer=_matmul, reference=np.matmul, inputs=(2, 2),
               flops=_matmul_flops, doc="numpy matmul: batched, broadcasting"))


def _axes(t: TensorType, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(t.rank))
    norm = [norm_axis(a, t.rank) for a in axes]
    if len(set(norm)) != len(norm):  # backends would reduce such an axis twice
        raise ShapeError(f"axes {list(axes)} name an axis twice (rank {t.rank})")
    return tuple(sorted(norm))


def _reduce(t: TensorType, axes=None, keepdims=False) -> TensorType:
    red = _axes(t, axes)
    shape = tuple(1 if i in red else d for i, d in enumerate(t.shape)
                  if keepdims or i not in red)
    return TensorType(shape, t.dtype)


def _reducer(fn):
    def ref(x, axes=None, keepdims=False):
        return np.asarray(fn(x, axis=None if axes is None else tuple(axes),
                             keepdims=keepdims)).astype(x.dtype)
    return ref


def _extreme(fn, sign: int):
    """max/min where an empty set gives ONNX's answer (numpy raises): -inf/+inf, or the
    integer type's lowest/highest."""
    def with_initial(x, axis, keepdims):
        if x.dtype.kind == "f":
            init = sign * np.inf
        elif x.dtype.kind == "b":
            init = sign > 0
        else:
            info = np.iinfo(x.dtype)
            init = info.max if sign > 0 else info.min
        return fn(x, axis=axis, keepdims=keepdims, initial=init)
    return with_initial


_REDUCE_ATTRS = {"axes": Attr("ints", None), "keepdims": Attr("bool", False)}
for _name, _fn in {"reduce_sum": np.sum, "reduce_mean": np.mean,
                   "reduce_max": _extreme(np.max, -1),
                   "reduce_min": _extreme(np.min, +1)}.items():
    register(OpDef(_name, infer=_reduce, reference=_reducer(_fn), attrs=_REDUCE_ATTRS,
                   kind="reduction",
                   flops=lambda outs, x, **attrs: numel(x)))


def _argmax(t: TensorType, axis=-1, keepdims=False) -> TensorType:
    return TensorType(_reduce(t, (axis,), keepdims).shape, "i64")


register(OpDef("argmax", infer=_argmax, kind="reduction",
               reference=lambda x, axis=-1, keepdims=False: np.argmax(
                   x, axis=axis, keepdims=keepdims).astype(np.int64),
               attrs={"axis": Attr("int", -1), "keepdims": Attr("bool", False)}))


def _float_only(t: TensorType, **_) -> TensorType:
    if t.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"expects a float tensor, got {t}")
    return t


def _softmax_axis(t: TensorType, axis=-1) -> TensorType:
    norm_axis(axis, t.rank)
    return _float_only(t)


def softmax(x, axis=-1):   # initial=-inf: an empty axis (seq 0) gives an empty result
    e = np.exp(x - x.max(axis=axis, keepdims=True, initial=-np.inf))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    s = x - x.max(axis=axis, keepdims=True, initial=-np.inf)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


register(OpDef("softmax", infer=_softmax_axis, reference=softmax, kind="reduction",
               attrs={"axis": Attr("int", -1)}, flops=elementwise_flops(5)))
register(OpDef("log_softmax", infer=_softmax_axis, reference=log_softmax, kind="reduction",
               attrs={"axis": Attr("int", -1)}, flops=elementwise_flops(5)))


def _layer_norm(x: TensorType, *params: TensorType, axis=-1, eps=1e-5) -> TensorType:
    _float_only(x)
    ax = norm_axis(axis, x.rank)
    for p in params:
        same_dtype(x, p)
        if broadcast_shapes(TensorType(x.shape[ax:]), p) != x.shape[ax:]:
            raise ShapeError(f"scale/bias {p} does not fit normalised dims of {x} (axis {axis})")
    return x


def layer_norm(x, weight=None, bias=None, axis=-1, eps=1e-5):
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + x.dtype.type(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


register(OpDef("layer_norm", infer=_layer_norm, reference=layer_norm, inputs=(1, 3),
               kind="reduction", attrs={"axis": Attr("int", -1), "eps": Attr("float", 1e-5)},
               flops=elementwise_flops(8),
               doc="normalise over axes [axis, rank), then scale and shift (ONNX semantics)"))


def _conv_out(n, k, stride, pad0, pad1, dil):
    return (n + pad0 + pad1 - dil * (k - 1) - 1) // stride + 1


def _conv2d(x: TensorType, w: TensorType, *b: TensorType, strides=(1, 1), pads=(0, 0, 0, 0),
            dilations=(1, 1), group=1) -> TensorType:
    same_dtype(x, w, *b)
    if x.rank != 4 or w.rank != 4:
        raise ShapeError(f"expects NCHW input and OIHW weight, got {x} and {w}")
    n, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    if c != ci * group or o % group:
        raise ShapeError(f"channels do not fit (group={group}): input {x}, weight {w}")
    if b and b[0].shape != (o,):
        raise ShapeError(f"bias {b[0]} should be [{o}] for weight {w}")
    if not all(isinstance(d, int) for d in (h, wd)):
        raise ShapeError(f"conv2d needs static spatial dims, got {x}")
    for name, vals, size, least in (("strides", strides, 2, 1), ("dilations", dilations, 2, 1),
                                    ("pads", pads, 4, 0)):
        if len(vals) != size or any(v < least for v in vals):
            raise ShapeError(f"{name} {list(vals)} should be {size} values "
                             f"{'> 0' if least else '>= 0'}")
    oh = _conv_out(h, kh, strides[0], pads[0], pads[2], dilations[0])
    ow = _conv_out(wd, kw, strides[1], pads[1], pads[3], dilations[1])
    if oh <= 0 or ow <= 0:
        raise ShapeError(f"kernel {w} is larger than padded input {x}")
    return TensorType((n, o, oh, ow), x.dtype)


def conv2d(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """Direct convolution by gathering windows (im2col) and one einsum per group."""
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    o, ci, kh, kw = w.shape
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    og = o // group
    outs = [np.einsum("nchwij,ocij->nohw", win[:, g * ci:(g + 1) * ci],
                      w[g * og:(g + 1) * og], optimize=True) for g in range(group)]
    y = np.concatenate(outs, axis=1)
    if b is not None:
        y = y + b[None, :, None, None]
    return y.astype(x.dtype)


def _conv_flops(outs, x, w, *b, **attrs):
    return 2 * numel(outs[0]) * int(np.prod(w.shape[1:]))


register(OpDef("conv2d", infer=_conv2d, reference=conv2d, inputs=(2, 3), flops=_conv_flops,
               attrs={"strides": Attr("ints", (1, 1)), "pads": Attr("ints", (0, 0, 0, 0)),
                      "dilations": Attr("ints", (1, 1)), "group": Attr("int", 1)},
               doc="2-D convolution, NCHW input, OIHW weight, pads (top, left, bottom, right)"))
