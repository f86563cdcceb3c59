"""Contractions, reductions and normalisations: matmul, reduce_* (sum, mean, max, min,
prod), argmax, softmax, layer_norm, conv2d."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..types import FLOAT_DTYPES, TensorType, dim_product
from . import vjp
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


def _matmul_vjp(g, node, dys):
    (a, b), (dy,) = node.inputs, dys
    # vectors as matrices: a [k] -> [1, k], b [k] -> [k, 1], dy alike
    a2 = a if a.type.rank > 1 else g.add("unsqueeze", a, axes=(0,))
    b2 = b if b.type.rank > 1 else g.add("unsqueeze", b, axes=(1,))
    if a.type.rank == 1 or b.type.rank == 1:
        r = dy.type.rank
        axes = (0, 1) if a.type.rank == b.type.rank else (r - 1,) if a.type.rank == 1 else (r,)
        dy = g.add("unsqueeze", dy, axes=axes)
    da = vjp.sum_to(g, g.add("matmul", dy, vjp.swap_last(g, b2)), a2.type)
    if b2.type.rank == 2 and a2.type.rank > 2:
        # a weight shared by every row: one GEMM over the flattened rows, not one per batch
        k, n = a2.type.shape[-1], dy.type.shape[-1]
        rows = tuple(a2.type.shape[:-1])
        a_rows = g.add("reshape", a2, shape=(dim_product(rows), k))
        dy_rows = g.add("reshape", dy, shape=(dim_product(tuple(dy.type.shape[:-1])), n))
        db = g.add("matmul", vjp.swap_last(g, a_rows), dy_rows)
    else:
        db = vjp.sum_to(g, g.add("matmul", vjp.swap_last(g, a2), dy), b2.type)
    return [g.add("reshape", d, shape=x.type.shape) if d.type.shape != x.type.shape else d
            for d, x in ((da, a), (db, b))]


def _matmul_ref(a, b):
    """np.matmul; bfloat16 operands are widened to float32 first (ml_dtypes' own matmul
    returns float32) and the product rounded back once."""
    if a.dtype.name == "bfloat16":
        return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)
    return np.matmul(a, b)


register(OpDef("matmul", infer=_matmul, reference=_matmul_ref, inputs=(2, 2),
               flops=_matmul_flops, vjp=_matmul_vjp, doc="numpy matmul: batched, broadcasting"))


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
        if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
            init = sign * np.inf
        elif x.dtype.kind == "b":
            init = sign > 0
        else:
            info = np.iinfo(x.dtype)
            init = info.max if sign > 0 else info.min
        return fn(x, axis=axis, keepdims=keepdims, initial=init)
    return with_initial


def _reduce_vjp(g, node, dys):
    (x,), (y,), (dy,) = node.inputs, node.outputs, dys
    axes, keep = node.attrs["axes"], node.attrs["keepdims"]
    back = vjp.unreduce(g, dy, x.type, axes, keep)
    if node.op == "reduce_sum":
        return [back]
    red = range(x.type.rank) if axes is None else {a % x.type.rank for a in axes}
    if node.op == "reduce_mean":
        return [g.add("div", back, vjp.count(g, [x.type.shape[i] for i in red],
                                             x.type.dtype))]
    if node.op == "reduce_prod":
        return [g.add("mul", back, _prod_others(g, x, axes))]
    # max/min: the gradient is shared by the elements equal to the result
    hit = vjp.as_float(g, g.add("equal", x, vjp.unreduce(g, y, x.type, axes, keep)),
                       x.type.dtype)
    ties = g.add("reduce_sum", hit, axes=tuple(sorted(red)), keepdims=True)
    return [g.add("mul", back, g.add("div", hit, ties))]


def _prod_others(g, x, axes):
    """d prod / d x_i: the product of the other elements, exact with zeros (no y / x_i
    where x_i is 0): with no zero it is y / x_i; with one zero, the product of the rest
    at the zero and 0 elsewhere; with more, 0."""
    t = x.type
    zero, one = vjp.const(g, 0, t.dtype), vjp.const(g, 1, t.dtype)
    is0 = g.add("equal", x, zero)
    rest = vjp.unreduce(g, g.add("reduce_prod", g.add("where", is0, one, x), axes=axes,
                                 keepdims=True), t, axes, True)
    zeros = vjp.unreduce(g, g.add("reduce_sum", vjp.as_float(g, is0, t.dtype), axes=axes,
                                  keepdims=True), t, axes, True)
    no_zero = g.add("div", rest, g.add("where", is0, one, x))
    return g.add("where", g.add("equal", zeros, zero), no_zero, g.add(
        "where", g.add("logical_and", is0, g.add("equal", zeros, one)), rest, zero))


_REDUCE_ATTRS = {"axes": Attr("ints", None), "keepdims": Attr("bool", False)}
for _name, _fn in {"reduce_sum": np.sum, "reduce_mean": np.mean,
                   "reduce_max": _extreme(np.max, -1),
                   "reduce_min": _extreme(np.min, +1), "reduce_prod": np.prod}.items():
    register(OpDef(_name, infer=_reduce, reference=_reducer(_fn), attrs=_REDUCE_ATTRS,
                   kind="reduction", vjp=_reduce_vjp,
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


def _softmax_vjp(g, node, dys):   # y (dy - sum(dy y))
    (y,), (dy,), axis = node.outputs, dys, node.attrs["axis"]
    dot = g.add("reduce_sum", g.add("mul", dy, y), axes=(axis,), keepdims=True)
    return [g.add("mul", y, g.add("sub", dy, dot))]


def _log_softmax_vjp(g, node, dys):   # dy - exp(y) sum(dy)
    (y,), (dy,), axis = node.outputs, dys, node.attrs["axis"]
    total = g.add("reduce_sum", dy, axes=(axis,), keepdims=True)
    return [g.add("sub", dy, g.add("mul", g.add("exp", y), total))]


register(OpDef("softmax", infer=_softmax_axis, reference=softmax, kind="reduction",
               attrs={"axis": Attr("int", -1)}, flops=elementwise_flops(5), vjp=_softmax_vjp))
register(OpDef("log_softmax", infer=_softmax_axis, reference=log_softmax, kind="reduction",
               attrs={"axis": Attr("int", -1)}, flops=elementwise_flops(5),
               vjp=_log_softmax_vjp))


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


def _layer_norm_vjp(g, node, dys):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy * weight; the statistics
    are recomputed, not kept from the forward."""
    (x, *params), (dy,) = node.inputs, dys
    w, b = (params + [None, None])[:2]
    axes = tuple(range(node.attrs["axis"] % x.type.rank, x.type.rank))
    dt = x.type.dtype

    def mean(v):
        return g.add("reduce_mean", v, axes=axes, keepdims=True)
    xc = g.add("sub", x, mean(x))
    rstd = g.add("rsqrt", g.add("add", mean(g.add("mul", xc, xc)),
                                vjp.const(g, node.attrs["eps"], dt)))
    xhat = g.add("mul", xc, rstd)
    gx = dy if w is None else g.add("mul", dy, w)
    inner = g.add("sub", g.add("sub", gx, mean(gx)), g.add("mul", xhat, mean(g.add("mul", gx,
                                                                                  xhat))))
    grads = [g.add("mul", rstd, inner)]
    if w is not None:
        grads.append(vjp.sum_to(g, g.add("mul", dy, xhat), w.type))
    if b is not None:
        grads.append(vjp.sum_to(g, dy, b.type))
    return grads


register(OpDef("layer_norm", infer=_layer_norm, reference=layer_norm, inputs=(1, 3),
               kind="reduction", attrs={"axis": Attr("int", -1), "eps": Attr("float", 1e-5)},
               flops=elementwise_flops(8), vjp=_layer_norm_vjp,
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


def _windows(x, kh, kw, strides, pads, dilations):
    """x padded, and its sliding windows [n, c, oh, ow, kh, kw] (a view)."""
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    return x, win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]


def conv2d(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """Direct convolution by gathering windows (im2col) and one einsum per group."""
    o, ci, kh, kw = w.shape
    _, win = _windows(x, kh, kw, strides, pads, dilations)
    og = o // group
    outs = [np.einsum("nchwij,ocij->nohw", win[:, g * ci:(g + 1) * ci],
                      w[g * og:(g + 1) * og], optimize=True) for g in range(group)]
    y = np.concatenate(outs, axis=1)
    if b is not None:
        y = y + b[None, :, None, None]
    return y.astype(x.dtype)


def _conv_flops(outs, x, w, *b, **attrs):
    return 2 * numel(outs[0]) * int(np.prod(w.shape[1:]))


_CONV_ATTRS = {"strides": Attr("ints", (1, 1)), "pads": Attr("ints", (0, 0, 0, 0)),
               "dilations": Attr("ints", (1, 1)), "group": Attr("int", 1)}


def conv2d_grad(x, w, dy, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """(dx, dw) of conv2d: dw correlates the input windows with dy; dx adds each window's
    share back where the window came from."""
    o, ci, kh, kw = w.shape
    xp, win = _windows(x, kh, kw, strides, pads, dilations)
    og, oh, ow = o // group, dy.shape[2], dy.shape[3]
    dw = np.concatenate([np.einsum("nchwij,nohw->ocij", win[:, g * ci:(g + 1) * ci],
                                   dy[:, g * og:(g + 1) * og], optimize=True)
                         for g in range(group)], axis=0)
    dwin = np.concatenate([np.einsum("nohw,ocij->nchwij", dy[:, g * og:(g + 1) * og],
                                     w[g * og:(g + 1) * og], optimize=True)
                           for g in range(group)], axis=1)
    dxp = np.zeros_like(xp)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilations[0], j * dilations[1]
            dxp[:, :, r0:r0 + strides[0] * oh:strides[0],
                c0:c0 + strides[1] * ow:strides[1]] += dwin[..., i, j]
    dx = dxp[:, :, pads[0]:pads[0] + x.shape[2], pads[1]:pads[1] + x.shape[3]]
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _conv2d_vjp(g, node, dys):
    (x, w, *b), (dy,) = node.inputs, dys
    dx, dw = g.add_node("conv2d_grad", [x, w, dy], node.attrs)
    return [dx, dw] + [g.add("reduce_sum", dy, axes=(0, 2, 3))] * len(b)


register(OpDef("conv2d", infer=_conv2d, reference=conv2d, inputs=(2, 3), flops=_conv_flops,
               attrs=_CONV_ATTRS, vjp=_conv2d_vjp,
               doc="2-D convolution, NCHW input, OIHW weight, pads (top, left, bottom, right)"))
register(OpDef("conv2d_grad", inputs=(3, 3), reference=conv2d_grad, attrs=_CONV_ATTRS,
               infer=lambda x, w, dy, **attrs: [x, w],
               flops=lambda outs, x, w, dy, **attrs: 2 * _conv_flops([dy], x, w),
               doc="the gradients (dx, dw) of conv2d(x, w) given the output's gradient dy"))


# --- dropout: a counter-based mask, the same on every backend ---------------------------

# The mask is a hash of (seed, salt, element index) in 64-bit integer arithmetic that
# every backend computes exactly alike (products stay below 2**63): the index times a
# multiplier drawn from the seed (so two seeds give unrelated masks, not shifted copies
# of one), then two squarings modulo two different primes. Not cryptographic; tests check
# the keep rate and that neighbouring elements, salts and seeds are independent.
_P, _Q = 2147483647, 2147483629


def dropout_keep(seed: int, shape, p: float, salt: int) -> np.ndarray:
    idx = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.int64).reshape(shape)
    s = np.fmod(np.int64(seed), _P)
    s = s + _P if s < 0 else s
    m = np.fmod(s * 48271, _P - 1) + 1
    x0 = np.fmod(np.fmod(idx + (salt * 7919 + 1), _P) * m, _P)
    x1 = np.fmod(x0 * x0 + 12345, _Q)
    x2 = np.fmod(x1 * x1 + x0, _P)
    return x2 >= int(p * _P)


def shifted_salt(salt: int, offset: int) -> int:
    """The salt whose masks are those of `salt` with every element index moved on by
    `offset` (the hash adds salt * 7919 to the index modulo _P, a prime): a rank holding
    rows of a batch draws the masks the whole batch's rows draw there."""
    return (salt + offset * pow(7919, -1, _P)) % _P


def _dropout_ref(x, seed, p=0.1, salt=0):
    keep = dropout_keep(int(seed), x.shape, p, salt)
    return np.where(keep, x * x.dtype.type(1.0 / (1.0 - p)), x.dtype.type(0)).astype(x.dtype)


def _dropout_infer(x: TensorType, seed: TensorType, p=0.1, salt=0) -> TensorType:
    _float_only(x)
    if seed.rank != 0 or seed.dtype != "i64":
        raise ShapeError(f"the seed must be an i64 scalar, got {seed}")
    if not 0.0 <= p < 1.0:
        raise ShapeError(f"p={p} must be in [0, 1)")
    return x


def _dropout_decompose(graph, inputs, p, salt) -> list:
    """The same hash in primitive integer ops (so every backend generates it)."""
    x, seed = inputs

    def c(v):
        return vjp.const(graph, v, "i64")

    def fmod(a, m):   # integer division truncates, as C's % does
        return graph.add("sub", a, graph.add("mul", graph.add("div", a, c(m)), c(m)))
    n = dim_product(x.type.shape)
    idx = graph.add("reshape", graph.add("range", start=(0,), limit=(n,)), shape=x.type.shape)
    s = fmod(seed, _P)
    s = graph.add("where", graph.add("less", s, c(0)), graph.add("add", s, c(_P)), s)
    m = graph.add("add", fmod(graph.add("mul", s, c(48271)), _P - 1), c(1))
    x0 = fmod(graph.add("mul", fmod(graph.add("add", idx, c(salt * 7919 + 1)), _P), m), _P)
    x1 = fmod(graph.add("add", graph.add("mul", x0, x0), c(12345)), _Q)
    x2 = fmod(graph.add("add", graph.add("mul", x1, x1), x0), _P)
    keep = graph.add("greater_equal", x2, c(int(p * _P)))
    return [vjp.mask(graph, keep, vjp.scale(graph, x, 1.0 / (1.0 - p)))]


register(OpDef(
    "dropout", infer=_dropout_infer, reference=_dropout_ref, inputs=(2, 2),
    attrs={"p": Attr("float", 0.1), "salt": Attr("int", 0)}, decompose=_dropout_decompose,
    flops=elementwise_flops(12),
    vjp=lambda g, node, dys: [g.add("dropout", dys[0], node.inputs[1], **node.attrs), None],
    doc="training dropout: x / (1 - p) where a hash of (seed, salt, element index) keeps "
        "it, else 0; `salt` tells the dropouts of one graph apart",
))
