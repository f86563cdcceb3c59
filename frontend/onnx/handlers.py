"""The ONNX op handlers: one per op type (the `HANDLERS` table). Each takes the importer
and an `OnnxNode` and returns the node's outputs as entries, building IR ops through
`cx.op`, which folds an op whose inputs are all known (see `importer.py`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from tensorc.errors import ShapeError
from tensorc.ir import FLOAT_DTYPES, Dim, TensorType, Value, dim_product
from tensorc.ops.shape import SLICE_END

from .values import FOLD_LIMIT, RANGE_BYTES, Entry, Sym, _dtype, _known, onnx_dtype

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .importer import OnnxNode, _Importer

# --- handlers: one per ONNX op type ----------------------------------------------------

def _unary(op):
    return lambda cx, n: [cx.op(op, n.x(0))]


def _binary(op):
    return lambda cx, n: [cx.op(op, n.x(0), n.x(1))]


def _variadic(op, mean=False):
    def h(cx, n):
        acc = n.x(0)
        for k in range(1, len(n.inputs)):
            acc = cx.op(op, acc, n.x(k))
        if mean:
            acc = cx.op("div", acc, _scalar(len(n.inputs), _dtype(acc)))
        return [acc]
    return h




def _shape(e: Entry) -> tuple:
    return e.type.shape if isinstance(e, Value) else (
        e.dims.shape if isinstance(e, Sym) else e.shape)


def _scalar(v, dtype: str) -> np.ndarray:
    return np.asarray(v, TensorType((), dtype).np_dtype)


def _dim(d: Dim, dtype: str) -> np.ndarray | Sym:
    """A dim as a scalar entry: a number, or a symbol the graph reads at run time."""
    return _known(np.array(d, dtype=object), dtype)


def _axes(n: OnnxNode, attr_until: int, k: int = 1) -> list[int] | None:
    """Axes from the attribute (opsets before `attr_until`) or from input k."""
    if n.cx.opset < attr_until:
        return n.attr("axes")
    return n.consts(k, "axes")


def _check_axes(n: OnnxNode, axes: list, rank: int, repeats: bool = False) -> list[int]:
    """Axes as ONNX defines them: each in [-rank, rank), returned >= 0; none twice, or
    with `repeats` (Squeeze, ReduceX: ONNX Runtime counts such an axis once) deduplicated."""
    out = []
    for a in axes:
        if isinstance(a, str) or not -rank <= a < rank:
            raise ShapeError(f"{n.where}: axis {a} is out of range for rank {rank} "
                             f"(ONNX allows {-rank} to {rank - 1})")
        a = a + rank if a < 0 else a
        if a in out and not repeats:
            raise ShapeError(f"{n.where}: axes {list(axes)} name axis {a} twice")
        if a not in out:
            out.append(a)
    return out


def _constant(cx, n):
    for key, val in n.attrs.items():
        if key == "value":
            return [cx._tensor(val, n.where)]
        if key in ("value_float", "value_floats"):
            return [np.asarray(val, np.float32)]
        if key in ("value_int", "value_ints"):
            return [np.asarray(val, np.int64)]
    raise n.unsupported(f"attribute {sorted(n.attrs)} is not supported")


def _constant_of_shape(cx, n):
    shape = n.consts(0, "shape")
    value = n.attrs.get("value")
    arr = numpy_helper.to_array(value).reshape(-1) if value is not None else \
        np.zeros(1, np.float32)
    dtype = onnx_dtype(value.data_type, n.where) if value is not None else "f32"
    return [cx.op("full", shape=shape, value=arr[0].item(), dtype=dtype)]


def _shape_op(cx, n):
    dims = np.array(list(_shape(n.x(0))), dtype=object)
    start, end = n.attr("start", 0), n.attr("end", None)
    return [_known(dims[start:end], "i64")]


def _size(cx, n):
    return [_known(np.array(dim_product(_shape(n.x(0))), dtype=object), "i64")]


def _reshape(cx, n):
    x, shape = n.x(0), n.consts(1, "target shape")
    if not n.attr("allowzero", 0):
        shape = [_shape(x)[i] if d == 0 else d for i, d in enumerate(shape)]
    return [cx.op("reshape", x, shape=shape)]


def _flatten(cx, n):
    shape = _shape(n.x(0))
    axis = n.attr("axis", 1)
    if not -len(shape) <= axis <= len(shape):
        raise ShapeError(f"{n.where}: axis {axis} is out of range for rank {len(shape)} "
                         f"(ONNX allows {-len(shape)} to {len(shape)})")
    axis = axis + len(shape) if axis < 0 else axis
    return [cx.op("reshape", n.x(0), shape=[dim_product(shape[:axis]),
                                            dim_product(shape[axis:])])]


def _squeeze(cx, n):
    axes = _axes(n, 13)
    if axes is None:
        axes = [i for i, d in enumerate(_shape(n.x(0))) if d == 1]
    return [cx.op("squeeze", n.x(0), axes=_check_axes(n, axes, len(_shape(n.x(0))),
                                                      repeats=True))]


def _unsqueeze(cx, n):
    axes = _axes(n, 13)
    if axes is None:
        raise ShapeError(f"{n.where}: needs axes")
    return [cx.op("unsqueeze", n.x(0), axes=_check_axes(n, axes, len(_shape(n.x(0))) +
                                                        len(axes)))]


def _transpose(cx, n):
    return [cx.op("transpose", n.x(0), perm=n.attr("perm"))]


def _concat(cx, n):
    xs = [n.x(k) for k in range(len(n.inputs)) if n.has(k)]
    return [cx.op("concat", *xs, axis=n.attr("axis"))]


def _split(cx, n):
    x, axis = n.x(0), n.attr("axis", 0)
    sizes = n.consts(1, "split sizes") if cx.opset >= 13 else n.attr("split")
    if sizes is not None:
        if any(isinstance(s, int) and s < 0 for s in sizes):
            raise ShapeError(f"{n.where}: split sizes {sizes} must be >= 0")
        return cx.op_multi("split", x, axis=axis, sizes=sizes)
    parts = n.attr("num_outputs")
    if cx.opset >= 18 and parts is None:
        raise ShapeError(f"{n.where}: gives neither the split sizes (input 1) nor "
                         "num_outputs; ONNX opset 18 needs one of them")
    if parts is not None and parts != len(n.outputs):
        raise ShapeError(f"{n.where}: num_outputs is {parts} but the node has "
                         f"{len(n.outputs)} outputs")
    parts = len(n.outputs)
    dim = _shape(x)[_check_axes(n, [axis], len(_shape(x)))[0]]
    if not isinstance(dim, int):
        raise n.unsupported(f"cannot split symbolic dim {dim} into {parts} parts")
    step = -(-dim // parts)
    if cx.opset < 18 and dim % parts:
        raise ShapeError(f"{n.where}: dim {dim} does not split evenly into {parts} parts "
                         f"(before opset 18 ONNX needs equal parts)")
    if step * (parts - 1) > dim:
        raise ShapeError(f"{n.where}: {parts} parts of {step} (the size ONNX gives each "
                         f"part but the last) overrun dim {dim}")
    sizes = [step] * (parts - 1) + [dim - step * (parts - 1)]
    return cx.op_multi("split", x, axis=axis, sizes=sizes)


def _clamp(v):
    return v if isinstance(v, str) else max(min(v, SLICE_END), -SLICE_END)


def _slice(cx, n):
    starts = [_clamp(v) for v in n.consts(1, "starts")]
    ends = [_clamp(v) for v in n.consts(2, "ends")]
    axes = n.consts(3, "axes")
    if axes is not None:
        axes = _check_axes(n, axes, len(_shape(n.x(0))))
    return [cx.op("slice", n.x(0), starts=starts, ends=ends, axes=axes,
                  steps=n.consts(4, "steps"))]


def _gather(cx, n):
    return [cx.op("gather", n.x(0), n.x(1), axis=n.attr("axis", 0))]


def _tensor_scatter(cx, n):
    """TensorScatter (opset 24, a key/value cache's write) in linear mode."""
    if n.attr("mode", "linear") != "linear":
        raise n.unsupported("only mode=linear is supported (circular buffers are not)")
    cache, update = n.x(0), n.x(1)
    index = n.x(2) if n.has(2) else cx.op("full", shape=[_shape(cache)[0]], value=0,
                                            dtype="i64")
    return [cx.op("tensor_scatter", cache, update, index, axis=n.attr("axis", -2))]


def _gather_nd(cx, n):
    """GatherND (batch_dims=0) as gather on the flattened leading dims."""
    data, idx = n.x(0), n.x(1)
    if n.attr("batch_dims", 0):
        raise n.unsupported("batch_dims > 0 is not supported")
    shape, k = _shape(data), _shape(idx)[-1]
    if not isinstance(k, int):
        raise n.unsupported("needs a static index depth (the last dim of the indices)")
    flat = cx.op("reshape", data, shape=[dim_product(shape[:k])] + list(shape[k:]))
    lin = None
    dt = _dtype(idx)
    for i in range(k):
        part = cx.op("squeeze", cx.op("slice", idx, starts=[i], ends=[i + 1], axes=[-1 % len(
            _shape(idx))]), axes=[-1])
        part = cx.op("where", cx.op("less", part, _scalar(0, dt)),
                     cx.op("add", part, _dim(shape[i], dt)), part)
        stride = dim_product(shape[i + 1:k])  # symbolic dims become run-time values
        part = cx.op("mul", part, _dim(stride, dt)) if stride != 1 else part
        lin = part if lin is None else cx.op("add", lin, part)
    return [cx.op("gather", flat, lin, axis=0)]


def _gather_elements(cx, n):
    """GatherElements as a gather on the flattened data: the indices give the coordinate
    along `axis`, every other coordinate is the element's own position (a range)."""
    data, idx = n.x(0), n.x(1)
    shape, ishape = _shape(data), _shape(idx)
    rank = len(shape)
    axis = _check_axes(n, [n.attr("axis", 0)], rank)[0]
    lin = None
    for d in range(rank):
        if d == axis:
            c = cx.op("cast", idx, dtype="i64")
            c = cx.op("where", cx.op("less", c, _scalar(0, "i64")),
                      cx.op("add", c, _dim(shape[d], "i64")), c)
        else:
            c = cx.op("reshape", cx.op("range", start=[0], limit=[ishape[d]]),
                      shape=[1] * d + [ishape[d]] + [1] * (rank - d - 1))
        stride = dim_product(shape[d + 1:])
        c = cx.op("mul", c, _dim(stride, "i64")) if stride != 1 else c
        lin = c if lin is None else cx.op("add", lin, c)
    flat = cx.op("reshape", data, shape=[dim_product(shape)])
    return [cx.op("gather", flat, lin, axis=0)]


def _expand(cx, n):
    return [cx.op("expand", n.x(0), shape=n.consts(1, "shape"))]


def _range(cx, n):
    start, limit, delta = (n.const(k, w) for k, w in enumerate(("start", "limit", "delta")))
    dt = _dtype(n.x(0))
    if {_dtype(n.x(1)), _dtype(n.x(2))} != {dt}:
        raise ShapeError(f"{n.where}: start, limit and delta have dtypes "
                         f"{[_dtype(n.x(k)) for k in range(3)]}; ONNX needs one dtype")
    if delta == 0:
        raise ShapeError(f"{n.where}: delta is 0; ONNX Range needs a non-zero delta")
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)):
        if not all(math.isfinite(v) for v in (start, limit, delta)):
            raise ShapeError(f"{n.where}: start {start}, limit {limit} and delta {delta} "
                             "must be finite")
        size = max(math.ceil((limit - start) / delta) if dt in FLOAT_DTYPES
                   else -(-(limit - start) // delta), 0)
        nbytes = size * TensorType((), dt).np_dtype.itemsize
        if nbytes > RANGE_BYTES:
            raise ShapeError(f"{n.where}: range({start}, {limit}, {delta}) has {size} "
                             f"elements ({nbytes / 2**30:.3g} GiB of {dt}), more than the "
                             f"{RANGE_BYTES / 2**30:.3g} GiB tensorc allows a Range")
        if dt in FLOAT_DTYPES or size <= FOLD_LIMIT:
            return [np.arange(start, limit, delta, dtype=TensorType((), dt).np_dtype)]
    return [cx.op("range", start=[start], limit=[limit], delta=delta, dtype=dt)]


def _cast(cx, n):
    return [cx.op("cast", n.x(0), dtype=onnx_dtype(n.attr("to"), n.where))]


def _cast_like(cx, n):
    return [cx.op("cast", n.x(0), dtype=_dtype(n.x(1)))]


def _identity(cx, n):
    return [n.x(0)]


def _dropout(cx, n):
    x = n.x(0)
    if n.has(2) and n.const(2, "training_mode") and n.const(1, "ratio", 0.5):
        # an exported wrapper left in train mode: imported graphs are for inference, so
        # the identity, said once (ONNX Runtime 1.2x does drop here, at random)
        log.warning("%s: Dropout with training_mode=True runs as the identity (inference); "
                    "ONNX Runtime would drop at random", n.where)
    return [x, cx.op("full", shape=list(_shape(x)), value=True, dtype="bool")]


def _pow(cx, n):
    x, y = n.x(0), n.x(1)
    xt, yt = _dtype(x), _dtype(y)
    if xt not in FLOAT_DTYPES and yt in FLOAT_DTYPES:
        # ONNX Runtime computes an integer base to a float power in double and truncates
        # (4 ** 0.5 is 2): casting the exponent to the base's type would give 4 ** 0 = 1
        p = cx.op("pow", cx.op("cast", x, dtype="f64"),
                  cx.op("cast", y, dtype="f64") if yt != "f64" else y)
        return [cx.op("cast", p, dtype=xt)]
    if xt not in FLOAT_DTYPES and not isinstance(y, Value):
        e = np.asarray(y.dims if isinstance(y, Sym) else y)
        neg = [v for v in e.reshape(-1).tolist() if not isinstance(v, str) and v < 0]
        if neg:
            raise ShapeError(f"{n.where}: integer base ({xt}) to the negative constant "
                             f"exponent {neg[0]}: the result is not an integer")
    if yt != xt:  # ONNX allows another exponent type; the result is x's
        y = cx.op("cast", y, dtype=xt)
    return [cx.op("pow", x, y)]


def _div(cx, n):
    x, y = n.x(0), n.x(1)
    if _dtype(x) not in FLOAT_DTYPES and not isinstance(y, Value):
        e = np.asarray(y.dims if isinstance(y, Sym) else y)
        if any(not isinstance(v, str) and v == 0 for v in e.reshape(-1).tolist()):
            raise ShapeError(f"{n.where}: integer ({_dtype(x)}) division by a constant "
                             "divisor that holds 0 (ONNX Runtime rejects it too)")
    return [cx.op("div", x, y)]


def _clip(cx, n):
    x = n.x(0)
    lo, hi = (n.attr("min"), n.attr("max")) if cx.opset < 11 else (n.x(1), n.x(2))
    if not isinstance(lo, Value) and not isinstance(hi, Value):
        lo = None if lo is None else np.asarray(lo).item()
        hi = None if hi is None else np.asarray(hi).item()
        if lo is None and hi is None:
            return [x]
        return [cx.op("clip", x, min=lo, max=hi)]
    x = cx.op("maximum", x, lo) if lo is not None else x
    return [cx.op("minimum", x, hi) if hi is not None else x]


def _where(cx, n):
    return [cx.op("where", n.x(0), n.x(1), n.x(2))]


def _gelu(cx, n):
    return [cx.op("gelu", n.x(0), approximate=n.attr("approximate", "none"))]


def _leaky_relu(cx, n):
    x = n.x(0)
    neg = cx.op("mul", x, _scalar(n.attr("alpha", 0.01), _dtype(x)))
    return [cx.op("where", cx.op("less", x, _scalar(0, _dtype(x))), neg, x)]


def _composed(fn):
    """A handler for an op written as a function of its first input, the node, and `k`
    (which makes a constant of the input's dtype)."""
    def h(cx, n):
        x = n.x(0)
        return [fn(cx.op, x, n, lambda v: _scalar(v, _dtype(x)))]
    return h


def _elu_part(op, x, k, alpha):  # alpha * (exp(x) - 1)
    return op("mul", op("sub", op("exp", x), k(1)), k(alpha))


# name: fn(op, x, node, k) for activations and friends that are compositions
COMPOSED = {
    "Ceil": lambda op, x, n, k: op("neg", op("floor", op("neg", x))),
    "Sign": lambda op, x, n, k: op("where", op("greater", x, k(0)), k(1), op(
        "where", op("less", x, k(0)), k(-1), k(0))),
    "Softplus": lambda op, x, n, k: op("log", op("add", op("exp", x), k(1))),
    "Softsign": lambda op, x, n, k: op("div", x, op("add", op("abs", x), k(1))),
    "Elu": lambda op, x, n, k: op("where", op("less", x, k(0)),
                                  _elu_part(op, x, k, n.attr("alpha", 1.0)), x),
    "Selu": lambda op, x, n, k: op("mul", op("where", op("less_equal", x, k(0)), _elu_part(
        op, x, k, n.attr("alpha", 1.67326319217681884765625)), x),
        k(n.attr("gamma", 1.05070102214813232421875))),
    "Celu": lambda op, x, n, k: op("add", op("maximum", x, k(0)), op("minimum", k(0), op(
        "mul", op("sub", op("exp", op("div", x, k(n.attr("alpha", 1.0)))), k(1)),
        k(n.attr("alpha", 1.0))))),
    "HardSigmoid": lambda op, x, n, k: op("clip", op("add", op(
        "mul", x, k(n.attr("alpha", 0.2))), k(n.attr("beta", 0.5))), min=0.0, max=1.0),
    "HardSwish": lambda op, x, n, k: op("mul", x, op("clip", op("add", op(
        "mul", x, k(1 / 6)), k(0.5)), min=0.0, max=1.0)),
    "ThresholdedRelu": lambda op, x, n, k: op("where", op(
        "greater", x, k(n.attr("alpha", 1.0))), x, k(0)),
    "Mish": lambda op, x, n, k: op("mul", x, op("tanh", op("log", op(
        "add", op("exp", x), k(1))))),
    "IsNaN": lambda op, x, n, k: op("logical_not", op("equal", x, x)),
    "IsInf": lambda op, x, n, k: op("logical_or", op(
        "equal", x, k(np.inf if n.attr("detect_positive", 1) else np.nan)),
        op("equal", x, k(-np.inf if n.attr("detect_negative", 1) else np.nan))),
    "Swish": lambda op, x, n, k: op("mul", x, op("sigmoid", op(
        "mul", x, k(n.attr("alpha", 1.0))))),
}


def _prelu(cx, n):
    x, slope = n.x(0), n.x(1)
    return [cx.op("where", cx.op("less", x, _scalar(0, _dtype(x))), cx.op("mul", x, slope), x)]


def _xor(cx, n):
    return [cx.op("logical_not", cx.op("equal", n.x(0), n.x(1)))]


def _tile(cx, n):
    """Tile as reshape [1,d0,1,d1,...] -> expand [r0,d0,r1,d1,...] -> reshape [r0*d0,...]."""
    x, reps = n.x(0), n.consts(1, "repeats")
    shape = _shape(x)
    inter = [1 if k % 2 == 0 else d for d in shape for k in range(2)]
    big = [v for d, r in zip(shape, reps, strict=True) for v in (r, d)]
    y = cx.op("expand", cx.op("reshape", x, shape=inter), shape=big)
    return [cx.op("reshape", y, shape=[dim_product([r, d]) for d, r in zip(
        shape, reps, strict=True)])]


def _rms_norm(cx, n):
    x, scale = n.x(0), n.x(1)
    rank = len(_shape(x))
    axes = list(range(n.attr("axis", -1) % rank, rank))
    ms = cx.op("reduce_mean", cx.op("mul", x, x), axes=axes, keepdims=True)
    inv = cx.op("rsqrt", cx.op("add", ms, _scalar(n.attr("epsilon", 1e-5), _dtype(x))))
    return [cx.op("mul", cx.op("mul", x, inv), scale)]


def _softmax(op):
    return lambda cx, n: [cx.op(op, n.x(0), axis=n.attr("axis", -1))]


def _matmul(cx, n):
    return [cx.op("matmul", n.x(0), n.x(1))]


def _gemm(cx, n):
    a, b = n.x(0), n.x(1)
    a = cx.op("transpose", a, perm=[1, 0]) if n.attr("transA", 0) else a
    b = cx.op("transpose", b, perm=[1, 0]) if n.attr("transB", 0) else b
    y, dt = cx.op("matmul", a, b), _dtype(a)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    y = cx.op("mul", y, _scalar(alpha, dt)) if alpha != 1.0 else y
    if n.has(2):
        c = cx.op("mul", n.x(2), _scalar(beta, dt)) if beta != 1.0 else n.x(2)
        y = cx.op("add", y, c)
    return [y]


def _conv(cx, n):
    x, w = n.x(0), n.x(1)
    b = [n.x(2)] if n.has(2) else []
    rank = len(_shape(x)) - 2
    if rank not in (1, 2):
        raise n.unsupported(f"only 1-D and 2-D convolutions are supported, got {rank}-D")
    kernel = list(_shape(w)[2:])
    if n.attr("kernel_shape") is not None and list(n.attr("kernel_shape")) != kernel:
        raise ShapeError(f"{n.where}: kernel_shape {n.attr('kernel_shape')} differs from "
                         f"the weight's spatial shape {kernel}")
    strides = n.attr("strides", [1] * rank)
    dil = n.attr("dilations", [1] * rank)
    pads = n.attr("pads", [0] * 2 * rank)
    auto = n.attr("auto_pad", "NOTSET")
    for name, vals, size, least in (("strides", strides, rank, 1), ("dilations", dil, rank, 1),
                                    ("pads", pads, 2 * rank, 0)):
        if len(vals) != size:
            raise ShapeError(f"{n.where}: {name} {vals} should have {size} values for a "
                             f"{rank}-D convolution")
        if any(v < least for v in vals):
            raise ShapeError(f"{n.where}: {name} {vals} must be "
                             f"{'positive' if least else '>= 0'} (ONNX)")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * rank
        for i, (d, k) in enumerate(zip(_shape(x)[2:], kernel, strict=True)):
            if not isinstance(d, int):
                raise n.unsupported("auto_pad SAME needs static spatial dims")
            total = max((-(-d // strides[i]) - 1) * strides[i] + (k - 1) * dil[i] + 1 - d, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + rank] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 2 * rank
    if rank == 1:  # run as 2-D with a height of 1
        x, w = cx.op("unsqueeze", x, axes=[2]), cx.op("unsqueeze", w, axes=[2])
        strides, dil, pads = [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
    y = cx.op("conv2d", x, w, *b, strides=strides, pads=pads, dilations=dil,
              group=n.attr("group", 1))
    return [cx.op("squeeze", y, axes=[2]) if rank == 1 else y]


def _layer_norm(cx, n):
    x = n.x(0)
    axis, eps = n.attr("axis", -1), n.attr("epsilon", 1e-5)
    params = [n.x(k) for k in (1, 2) if n.has(k)]
    outs = [cx.op("layer_norm", x, *params, axis=axis, eps=eps)]
    if any(n.outputs[1:]):  # Mean and InvStdDev, kept in reduced form
        axes = list(range(axis % len(_shape(x)), len(_shape(x))))
        mean = cx.op("reduce_mean", x, axes=axes, keepdims=True)
        d = cx.op("sub", x, mean)
        var = cx.op("reduce_mean", cx.op("mul", d, d), axes=axes, keepdims=True)
        outs += [mean, cx.op("rsqrt", cx.op("add", var, _scalar(eps, _dtype(x))))]
    return outs


def _batch_norm(cx, n):
    if n.attr("training_mode", 0):
        raise n.unsupported("training_mode=1 is not supported (inference only)")
    x, scale, bias, mean, var = (n.x(k) for k in range(5))
    dt, rank = _dtype(x), len(_shape(x))
    for what, p in zip(("scale", "B", "input_mean", "input_var"), (scale, bias, mean, var),
                       strict=True):
        if rank < 2 or list(_shape(p)) != [_shape(x)[1]]:
            raise ShapeError(f"{n.where}: {what} has shape {list(_shape(p))}; it should be "
                             f"[C] for input shape {list(_shape(x))}")

    def per_channel(p):
        return cx.op("unsqueeze", p, axes=list(range(1, rank - 1))) if rank > 2 else p
    inv = cx.op("div", per_channel(scale), cx.op("sqrt", cx.op(
        "add", per_channel(var), _scalar(n.attr("epsilon", 1e-5), dt))))
    y = cx.op("mul", cx.op("sub", x, per_channel(mean)), inv)
    return [cx.op("add", y, per_channel(bias))]


def _reduce(op, axes_input_from=18, pre=None, post=None):
    """ReduceX; `pre` and `post` make ReduceL2 and friends: post(reduce(pre(x)))."""
    def h(cx, n):
        x = pre(cx, n.x(0)) if pre else n.x(0)
        axes = _axes(n, axes_input_from) or None
        if axes is not None:
            axes = _check_axes(n, axes, len(_shape(x)), repeats=True)
        if axes is None and n.attr("noop_with_empty_axes", 0):
            y = x
        else:
            y = cx.op(op, x, axes=axes, keepdims=bool(n.attr("keepdims", 1)))
        return [post(cx, y) if post else y]
    return h


def _arg_extreme(lowest: bool):
    """ArgMax, and ArgMin as the argmax of an order-reversing map: `neg` for floats,
    `-1 - x` (bitwise not; exact at the integer minimum, where `neg` overflows) for
    signed integers, `max - x` for unsigned. Ties give the first index; select_last_index
    reverses the axis (a step -1 slice) and maps the index back. A NaN wins, as in
    numpy's argmax/argmin (the IR's argmax)."""
    def h(cx, n):
        x, axis, keep = n.x(0), n.attr("axis", 0), bool(n.attr("keepdims", 1))
        rank, dt = len(_shape(x)), _dtype(x)
        axis = _check_axes(n, [axis], rank)[0]
        if lowest:
            if dt in FLOAT_DTYPES:
                x = cx.op("neg", x)
            elif dt == "bool":
                raise ShapeError(f"{n.where}: ArgMin of a bool tensor (ONNX allows "
                                 "numeric types only)")
            else:
                info = np.iinfo(TensorType((), dt).np_dtype)
                x = cx.op("sub", _scalar(-1 if info.min else info.max, dt), x)
        if not n.attr("select_last_index", 0):
            return [cx.op("argmax", x, axis=axis, keepdims=keep)]
        size = _shape(x)[axis]  # the last extreme is the first one of the reversed axis
        if not isinstance(size, int):
            raise n.unsupported("select_last_index=1 needs a static axis")
        rev = cx.op("slice", x, starts=[-1], ends=[-SLICE_END], axes=[axis], steps=[-1])
        return [cx.op("sub", _scalar(size - 1, "i64"), cx.op("argmax", rev, axis=axis,
                                                              keepdims=keep))]
    return h


def _one_hot(cx, n):
    """OneHot as `equal(indices unsqueezed at axis, range(depth))` then `where(on, off)`:
    negative indices count from the end (+ depth), out-of-range ones match nothing (an
    all-off row). Float indices truncate to integers, as ONNX Runtime casts them."""
    idx, values = n.x(0), n.x(2)
    depth = n.const(1, "depth")
    if isinstance(depth, str):
        raise n.unsupported(f"depth {depth!r} must be a number known at import")
    depth = int(depth)
    if depth <= 0:
        raise ShapeError(f"{n.where}: depth {depth} must be positive")
    if _elems(values) != 2:
        raise ShapeError(f"{n.where}: values has shape {list(_shape(values))}; it should "
                         "be [2] (off, on)")
    rank = len(_shape(idx))
    axis = _check_axes(n, [n.attr("axis", -1)], rank + 1)[0]
    idx = cx.op("cast", idx, dtype="i64") if _dtype(idx) != "i64" else idx
    idx = cx.op("where", cx.op("less", idx, _scalar(0, "i64")),
                cx.op("add", idx, _scalar(depth, "i64")), idx)
    hot = cx.op("equal", cx.op("unsqueeze", idx, axes=[axis]), np.arange(
        depth, dtype=np.int64).reshape([depth] + [1] * (rank - axis)))
    values = cx.op("reshape", values, shape=[2])
    off, on = (cx.op("reshape", cx.op("slice", values, starts=[k], ends=[k + 1], axes=[0]),
                     shape=[]) for k in (0, 1))
    return [cx.op("where", hot, on, off)]


def _trilu(cx, n):
    return [cx.op("trilu", n.x(0), upper=bool(n.attr("upper", 1)),
                  k=n.const(1, "k", 0))]


def _einsum_diagonal(cx, x: Entry, t: str) -> tuple[Entry, str]:
    """x with each label that its term `t` repeats (a diagonal) taken once: the off-
    diagonal elements zeroed by a `where` with an identity mask, then summed away."""
    while len(set(t)) != len(t):
        c = next(c for c in t if t.count(c) > 1)
        p, q = t.index(c), t.index(c, t.index(c) + 1)
        shape = _shape(x)
        d = shape[p]
        if not isinstance(d, int) or shape[q] != d:
            raise ShapeError(f"the diagonal of label {c!r} needs equal static dims, got "
                             f"{shape[p]} and {shape[q]}")
        eye = np.eye(d, dtype=bool).reshape(
            [d if i in (p, q) else 1 for i in range(len(shape))][p:])
        x = cx.op("where", eye, x, _scalar(0, _dtype(x)))
        x = cx.op("reduce_sum", x, axes=[q], keepdims=False)
        t = t[:q] + t[q + 1:]
    return x, t


def _einsum(cx, n):
    """Einsum as transposes, reshapes, one batched `matmul` and `reduce_sum`: an
    ellipsis becomes fresh labels (right-aligned across operands), a repeated label in
    one operand is its diagonal, a label in one operand only and not in the output is
    summed first; then each label of two operands is batch (in both and the output),
    contracted (in both, not the output), left- or right-free, and the operands are
    transposed and reshaped to [batch, left, contracted] @ [batch, contracted, right]."""
    eq = n.attr("equation").replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) > 2:
        raise n.unsupported(f"equation {eq!r}: more than two operands are not supported")
    if len(terms) != len(n.inputs):
        raise ShapeError(f"{n.where}: equation {eq!r} has {len(terms)} operands, the "
                         f"node {len(n.inputs)} inputs")
    xs = [n.x(k) for k in range(len(terms))]
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in eq]
    ell_ranks = []
    for t, x in zip(terms, xs, strict=True):
        body = t.replace("...", "")
        if t.count("...") > 1 or "." in body or not body.isalpha() and body:
            raise ShapeError(f"{n.where}: term {t!r} of equation {eq!r} is not letters "
                             "with at most one ellipsis")
        rank = len(_shape(x))
        k = rank - len(body)
        if k < 0 or k and "..." not in t:
            raise ShapeError(f"{n.where}: term {t!r} of equation {eq!r} does not fit an "
                             f"operand of rank {rank}")
        ell_ranks.append(k)
    ell = "".join(free[:max(ell_ranks)])
    terms = [t.replace("...", ell[len(ell) - k:]) for t, k in zip(terms, ell_ranks,
                                                                   strict=True)]
    if arrow:
        out = out.replace("...", ell)
    else:
        counts = "".join(terms)
        out = ell + "".join(sorted(c for c in set(counts)
                                   if counts.count(c) == 1 and c not in ell))
    if len(set(out)) != len(out) or any(c not in "".join(terms) for c in out):
        raise ShapeError(f"{n.where}: the output {out!r} of equation {eq!r} repeats a "
                         "label or names one no operand has")
    for k in range(len(terms)):
        xs[k], terms[k] = _einsum_diagonal(cx, xs[k], terms[k])
    # sum away indices that appear in one operand only and not in the output
    for k, t in enumerate(terms):
        others = out + "".join(terms[:k] + terms[k + 1:])
        drop = [i for i, c in enumerate(t) if c not in others]
        if drop:
            xs[k] = cx.op("reduce_sum", xs[k], axes=drop, keepdims=False)
            terms[k] = "".join(c for c in t if c in others)
    if len(terms) == 1:
        perm = [terms[0].index(c) for c in out]
        return [cx.op("transpose", xs[0], perm=perm) if perm != sorted(perm) else xs[0]]
    size = {}
    for t, x in zip(terms, xs, strict=True):
        for c, d in zip(t, _shape(x), strict=True):
            s0 = size.setdefault(c, d)
            if s0 == 1 or s0 == d:
                size[c] = d
            elif d != 1 and isinstance(d, int) and isinstance(s0, int):
                raise ShapeError(f"{n.where}: index {c!r} of {eq!r} is {s0} in one "
                                 f"operand and {d} in another")
    for k, (t, x) in enumerate(zip(terms, xs, strict=True)):   # size-1 dims broadcast
        want = [size[c] for c in t]
        if list(_shape(x)) != want:
            xs[k] = cx.op("expand", x, shape=want)
    (a, b), (ta, tb) = xs, terms
    batch = [c for c in ta if c in tb and c in out]
    contr = [c for c in ta if c in tb and c not in out]
    left = [c for c in ta if c not in tb]
    right = [c for c in tb if c not in ta]
    prod = [dim_product([size[c] for c in g]) for g in (left, contr, right)]
    a = cx.op("transpose", a, perm=[ta.index(c) for c in batch + left + contr])
    a = cx.op("reshape", a, shape=[size[c] for c in batch] + prod[:2])
    b = cx.op("transpose", b, perm=[tb.index(c) for c in batch + contr + right])
    b = cx.op("reshape", b, shape=[size[c] for c in batch] + prod[1:])
    y = cx.op("reshape", cx.op("matmul", a, b), shape=[size[c] for c in batch + left + right])
    order = batch + left + right
    return [cx.op("transpose", y, perm=[order.index(c) for c in out])]


# --- quantization: QDQ, dynamic quantization, integer and QLinear ops -------------------
# A quantized ONNX parameter (scale, zero point) is a scalar (per tensor) or 1-D along
# `axis` (per axis); the IR's broadcast them numpy-style, so a 1-D one becomes
# [1, .., N, .., 1] at import. Requantization (QLinearMatMul, QLinearConv) is what ONNX
# Runtime computes: saturate(round_half_even(f32(acc) * (a_scale * b_scale / y_scale)) + y_zp).

QUANT_DTYPES = ("u8", "i8")
MAX_INT_CONV_TERMS = 4096   # kernel offsets x groups of an integer conv (one matmul each)


def _elems(e: Entry) -> int | None:
    shape = _shape(e)
    return int(np.prod(shape)) if all(isinstance(d, int) for d in shape) else None


def _per_axis(cx, n: OnnxNode, p: Entry, rank: int, axis: int, what: str) -> Entry:
    """A scalar or 1-D parameter as a shape that broadcasts against a rank-`rank` tensor
    along `axis` (one element: per tensor, rank 0)."""
    shape = _shape(p)
    if len(shape) == 0:
        return p
    if len(shape) != 1:
        raise n.unsupported(f"{what} has shape {list(shape)}: only a scalar or a 1-D "
                            "(per-axis) parameter is supported (blocked quantization is not)")
    if shape[0] == 1:
        return cx.op("reshape", p, shape=[])
    axis = _check_axes(n, [axis], rank)[0]
    return cx.op("reshape", p, shape=[1] * axis + [shape[0]] + [1] * (rank - axis - 1))


def _block_size(n: OnnxNode):
    if n.attr("block_size", 0):
        raise n.unsupported(f"blocked quantization (block_size={n.attr('block_size')}) is "
                            "not supported")


def _quant_dt(n: OnnxNode, e: Entry, what: str) -> str:
    dt = _dtype(e)
    if dt not in QUANT_DTYPES:
        raise n.unsupported(f"{what} is {dt}: only u8 and i8 quantization is supported")
    return dt


def _zero_point(cx, n: OnnxNode, k: int, scale: Entry, dtype: str) -> Entry:
    """Input k, the zero point, or a zero of `dtype` shaped like the scale."""
    if n.has(k):
        return n.x(k)
    return np.zeros([int(d) for d in _shape(scale)], TensorType((), dtype).np_dtype)


def _f32_scale(n: OnnxNode, scale: Entry, x: Entry | None = None):
    if _dtype(scale) != "f32" or (x is not None and _dtype(x) != "f32"):
        what = f"input {_dtype(x)}, " if x is not None else ""
        raise n.unsupported(f"{what}scale {_dtype(scale)}: only f32 data and scales are "
                            "supported")


def _quantize_linear(cx, n):
    _block_size(n)
    x, scale = n.x(0), n.x(1)
    _f32_scale(n, scale, x)
    if n.has(2):
        dtype = _quant_dt(n, n.x(2), "the zero point")
    else:
        code = n.attr("output_dtype", 0) or onnx.TensorProto.UINT8
        dtype = onnx_dtype(code, n.where) if code in (onnx.TensorProto.UINT8,
                                                      onnx.TensorProto.INT8) else None
        if dtype is None:
            raise n.unsupported(f"output_dtype {onnx.TensorProto.DataType.Name(code)}: only "
                                "uint8 and int8 quantization is supported")
    zp = _zero_point(cx, n, 2, scale, dtype)
    rank, axis = len(_shape(x)), n.attr("axis", 1)
    scale, zp = (_per_axis(cx, n, p, rank, axis, w) for p, w in ((scale, "the scale"),
                                                                 (zp, "the zero point")))
    return [cx.op("quantize", x, scale, zp)]


def _dequantize_linear(cx, n):
    _block_size(n)
    q, scale = n.x(0), n.x(1)
    _f32_scale(n, scale)
    if n.attr("output_dtype", 0) not in (0, onnx.TensorProto.FLOAT):
        raise n.unsupported("only an f32 output_dtype is supported")
    dt = _dtype(q)
    if dt == "i32":
        if n.has(2) and (isinstance(n.x(2), Value) or np.any(np.asarray(n.x(2)) != 0)):
            raise n.unsupported("an int32 input's zero point must be 0 (ONNX)")
        zp = np.zeros([int(d) for d in _shape(scale)], np.int32)
    else:
        _quant_dt(n, q, "the input")
        zp = _zero_point(cx, n, 2, scale, dt)
    rank, axis = len(_shape(q)), n.attr("axis", 1)
    scale, zp = (_per_axis(cx, n, p, rank, axis, w) for p, w in ((scale, "the scale"),
                                                                 (zp, "the zero point")))
    return [cx.op("dequantize", q, scale, zp)]


def _dynamic_quantize_linear(cx, n):
    x = n.x(0)
    if _dtype(x) != "f32":
        raise n.unsupported(f"input {_dtype(x)}: only f32 is supported")
    scale, zp = cx.op_multi("quant_params", x, dtype="u8")
    scale, zp = cx.op("reshape", scale, shape=[]), cx.op("reshape", zp, shape=[])
    return [cx.op("quantize", x, scale, zp), scale, zp]


def _mm_zero_points(cx, n: OnnxNode, a: Entry, b: Entry, za: Entry | None,
                    zb: Entry | None) -> list:
    """MatMulInteger's zero points as broadcastable shapes: A's per row ([M] -> [M, 1]),
    B's per column ([N] -> [1, N])."""
    out = []
    for x, z, axis, what in ((a, za, -2, "a_zero_point"), (b, zb, -1, "b_zero_point")):
        if z is None:
            out.append(None)
            continue
        if _dtype(z) != _dtype(x):
            raise ShapeError(f"{n.where}: {what} is {_dtype(z)}, its operand {_dtype(x)}")
        rank = len(_shape(x))
        if rank == 1 and len(_shape(z)) == 1 and _shape(z)[0] != 1:
            raise n.unsupported(f"{what}: a per-row zero point of a 1-D operand")
        if len(_shape(z)) >= 2:   # N-D ([..., M, 1] or [..., 1, N]): broadcasts as it is
            out.append(z)
            continue
        out.append(_per_axis(cx, n, z, rank, axis % rank, what))
    return out


def _matmul_integer(cx, n):
    a, b = n.x(0), n.x(1)
    for e, what in ((a, "A"), (b, "B")):
        _quant_dt(n, e, what)
    za, zb = _mm_zero_points(cx, n, a, b, n.x(2), n.x(3))
    if za is None and zb is not None:
        za = np.zeros((), TensorType((), _dtype(a)).np_dtype)
    return [cx.op("matmul_integer", a, b, *[z for z in (za, zb) if z is not None])]


def _conv_attrs(n: OnnxNode, x: Entry, w: Entry):
    """(strides, pads, dilations, group) of a 2-D Conv-like node, checked."""
    rank = len(_shape(x)) - 2
    if rank != 2:
        raise n.unsupported(f"only 2-D convolutions are supported, got {rank}-D")
    kernel = list(_shape(w)[2:])
    if n.attr("kernel_shape") is not None and list(n.attr("kernel_shape")) != kernel:
        raise ShapeError(f"{n.where}: kernel_shape {n.attr('kernel_shape')} differs from "
                         f"the weight's spatial shape {kernel}")
    strides, dil = n.attr("strides", [1, 1]), n.attr("dilations", [1, 1])
    pads = n.attr("pads", [0] * 4)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 4
        for i, (d, k) in enumerate(zip(_shape(x)[2:], kernel, strict=True)):
            total = max((-(-d // strides[i]) - 1) * strides[i] + (k - 1) * dil[i] + 1 - d, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 4
    for name, vals, size, least in (("strides", strides, 2, 1), ("dilations", dil, 2, 1),
                                    ("pads", pads, 4, 0)):
        if len(vals) != size or any(v < least for v in vals):
            raise ShapeError(f"{n.where}: {name} {vals} should be {size} values "
                             f"{'> 0' if least else '>= 0'} (ONNX)")
    return strides, pads, dil, n.attr("group", 1)


def _int_conv(cx, n: OnnxNode, x: Entry, w: Entry, zx: Entry | None, zw: Entry | None):
    """ConvInteger exactly, in i32: (x - zx) and (w - zw) widened, zero padding (which
    is padding x with its zero point, as ONNX Runtime does), then one i32 matmul per
    kernel offset and group: y[n, :, i, j] += x[n, :, i*s + di, j*s + dj] @ w[:, :, di, dj]^T.
    Every product and sum is an exact integer (conv2d itself runs in f32, exact only
    below 2**24, and llvm's conv is f32 only)."""
    _quant_dt(n, x, "x")
    _quant_dt(n, w, "w")
    strides, pads, dil, group = _conv_attrs(n, x, w)
    xs, ws = _shape(x), _shape(w)
    if not all(isinstance(d, int) for d in list(xs[1:]) + list(ws)):
        raise n.unsupported("needs static channel and spatial dims")
    nb, c, h, wd = xs
    o, ci, kh, kw = ws
    if c != ci * group or o % group:
        raise ShapeError(f"{n.where}: channels do not fit (group={group}): input "
                         f"{list(xs)}, weight {list(ws)}")
    if group == 1 and list(strides) == [kh, kw] and not any(pads) and list(dil) == [1, 1] \
            and h % kh == 0 and wd % kw == 0:
        return _int_patches(cx, n, x, w, zx, zw)
    wide = cx.op("cast", x, dtype="i32")
    if zx is not None:
        if _shape(zx) not in ((), (1,)):
            raise n.unsupported("x_zero_point must be a scalar (per tensor)")
        wide = cx.op("sub", wide, cx.op("cast", cx.op("reshape", zx, shape=[]), dtype="i32"))
    ww = cx.op("cast", w, dtype="i32")
    if zw is not None:
        ww = cx.op("sub", ww, cx.op("cast", _per_axis(cx, n, zw, 4, 0, "w_zero_point"),
                                    dtype="i32"))
    top, left, bottom, right = pads
    if top or bottom:
        parts = [cx.op("full", shape=[nb, c, p, wd], value=0, dtype="i32")
                 for p in (top, bottom)]
        wide = cx.op("concat", *[p for p, k in zip((parts[0], wide, parts[1]),
                                                   (top, 1, bottom), strict=True) if k],
                     axis=2)
    hp = h + top + bottom
    if left or right:
        parts = [cx.op("full", shape=[nb, c, hp, p], value=0, dtype="i32")
                 for p in (left, right)]
        wide = cx.op("concat", *[p for p, k in zip((parts[0], wide, parts[1]),
                                                   (left, 1, right), strict=True) if k],
                     axis=3)
    wp = wd + left + right
    oh = (hp - (kh - 1) * dil[0] - 1) // strides[0] + 1
    ow = (wp - (kw - 1) * dil[1] - 1) // strides[1] + 1
    if oh <= 0 or ow <= 0:
        raise ShapeError(f"{n.where}: kernel {list(ws)} is larger than the padded input")
    if kh * kw * group > MAX_INT_CONV_TERMS:
        raise n.unsupported(f"{kh}x{kw} kernel in {group} groups is {kh * kw * group} "
                            f"integer matmuls, more than the {MAX_INT_CONV_TERMS} tensorc "
                            "writes a ConvInteger as")
    og = o // group
    outs = []
    for g in range(group):
        xg = cx.op("slice", wide, starts=[g * ci], ends=[(g + 1) * ci], axes=[1]) \
            if group > 1 else wide
        acc = None
        for di in range(kh):
            for dj in range(kw):
                r0, c0 = di * dil[0], dj * dil[1]
                win = cx.op("slice", xg, starts=[r0, c0],
                            ends=[r0 + strides[0] * (oh - 1) + 1, c0 + strides[1] * (ow - 1) + 1],
                            axes=[2, 3], steps=[strides[0], strides[1]])
                win = cx.op("transpose", win, perm=[0, 2, 3, 1])          # [n, oh, ow, ci]
                wk = cx.op("slice", ww, starts=[g * og, di, dj],
                           ends=[(g + 1) * og, di + 1, dj + 1], axes=[0, 2, 3])
                wk = cx.op("transpose", cx.op("reshape", wk, shape=[og, ci]), perm=[1, 0])
                term = cx.op("matmul", win, wk)                              # [n, oh, ow, og]
                acc = term if acc is None else cx.op("add", acc, term)
        outs.append(acc)
    y = outs[0] if group == 1 else cx.op("concat", *outs, axis=3)
    return cx.op("transpose", y, perm=[0, 3, 1, 2])


def _int_patches(cx, n: OnnxNode, x: Entry, w: Entry, zx: Entry | None, zw: Entry | None):
    """A ConvInteger whose windows tile the image (stride = kernel, no padding: a vision
    transformer's patch embedding) as one `matmul_integer` of the 8-bit patches: the
    patches are a reshape and transpose of x, so no widening and one integer GEMM."""
    nb, c, h, wd = _shape(x)
    o, _, kh, kw = _shape(w)
    oh, ow = h // kh, wd // kw
    patches = cx.op("reshape", cx.op("transpose", cx.op(
        "reshape", x, shape=[nb, c, oh, kh, ow, kw]), perm=[0, 2, 4, 1, 3, 5]),
        shape=[nb, oh * ow, c * kh * kw])
    wt = cx.op("transpose", cx.op("reshape", w, shape=[o, c * kh * kw]), perm=[1, 0])
    zps = []
    if zx is not None or zw is not None:
        if zx is not None and _shape(zx) not in ((), (1,)):
            raise n.unsupported("x_zero_point must be a scalar (per tensor)")
        zps.append(cx.op("reshape", zx, shape=[]) if zx is not None
                   else np.zeros((), TensorType((), _dtype(x)).np_dtype))
    if zw is not None:
        zps.append(cx.op("reshape", zw, shape=[1, o]) if _elems(zw) > 1
                   else cx.op("reshape", zw, shape=[]))
    y = cx.op("matmul_integer", patches, wt, *zps)                  # [n, oh*ow, o]
    return cx.op("reshape", cx.op("transpose", y, perm=[0, 2, 1]), shape=[nb, o, oh, ow])


def _conv_integer(cx, n):
    return [_int_conv(cx, n, n.x(0), n.x(1), n.x(2), n.x(3))]


def _requantize(cx, n: OnnxNode, acc: Entry, multiplier: Entry, zy: Entry) -> Entry:
    """ONNX Runtime's requantization (MLAS): the i32 accumulator in f32 times the f32
    multiplier, rounded half to even, plus the zero point, saturated; `quantize` with a
    scale of 1 computes exactly that (x / 1 is x)."""
    y = cx.op("mul", cx.op("cast", acc, dtype="f32"), multiplier)
    return cx.op("quantize", y, np.ones(_shape(zy), np.float32), zy)


def _qlinear_matmul(cx, n):
    a, sa, za, b, sb, zb, sy, zy = (n.x(k) for k in range(8))
    sa, sb, sy = (_f16_scale(cx, s) for s in (sa, sb, sy))
    for s in (sa, sb, sy):
        _f32_scale(n, s)
    _quant_dt(n, a, "A")
    _quant_dt(n, b, "B")
    _quant_dt(n, zy, "y_zero_point")
    za, zb = _mm_zero_points(cx, n, a, b, za, zb)
    sa, sb = _mm_zero_points_scale(cx, n, a, b, sa, sb)
    rank = max(len(_shape(a)), len(_shape(b)), 2)
    sy, zy = (_per_axis(cx, n, p, rank, rank - 1, w) for p, w in ((sy, "y_scale"),
                                                                  (zy, "y_zero_point")))
    acc = cx.op("matmul_integer", a, b, za, zb)
    return [_requantize(cx, n, acc, cx.op("div", cx.op("mul", sa, sb), sy), zy)]


def _mm_zero_points_scale(cx, n, a, b, sa, sb):
    """MatMul scales placed like their zero points (A per row, B per column)."""
    return [s if len(_shape(s)) >= 2 else
            _per_axis(cx, n, s, len(_shape(x)), axis % len(_shape(x)), w)
            for x, s, axis, w in ((a, sa, -2, "a_scale"), (b, sb, -1, "b_scale"))]


def _f16_scale(cx, s: Entry) -> Entry:
    """An f16 scale (QLinearMatMul allows them) widened to f32, exactly."""
    return cx.op("cast", s, dtype="f32") if _dtype(s) == "f16" else s


def _qlinear_conv(cx, n):
    x, sx, zx, w, sw, zw, sy, zy = (n.x(k) for k in range(8))
    for s in (sx, sw, sy):
        _f32_scale(n, s)
    _quant_dt(n, zy, "y_zero_point")
    if len(_shape(sy)) and _elems(sy) != 1:
        raise n.unsupported("y_scale must be a scalar (per tensor)")
    acc = _int_conv(cx, n, x, w, zx, zw)
    if n.has(8):
        if _dtype(n.x(8)) != "i32":
            raise ShapeError(f"{n.where}: the bias must be int32, got {_dtype(n.x(8))}")
        acc = cx.op("add", acc, cx.op("reshape", n.x(8), shape=[_shape(n.x(8))[0], 1, 1]))
    sx = cx.op("reshape", sx, shape=[]) if len(_shape(sx)) else sx
    multiplier = cx.op("div", cx.op("mul", sx, _per_axis(cx, n, sw, 4, 1, "w_scale")),
                       cx.op("reshape", sy, shape=[]) if len(_shape(sy)) else sy)
    zy = cx.op("reshape", zy, shape=[]) if len(_shape(zy)) else zy
    return [_requantize(cx, n, acc, multiplier, zy)]


# --- Mod, global pools, Pad, CumSum, instance and group norm (compositions) -------------

def _mod(cx, n):
    """Mod from div/floor/mul/sub: fmod=1 is C's fmod (the sign of x), fmod=0 Python's
    rule (the sign of y). Floats are computed in f64 (f32 and f16 exactly: the quotient's
    integer part times y needs no rounding there); integers truncate with `div`, so a
    divisor of 0 at run time gives x (ONNX Runtime fails the run), and a constant one is
    refused at import as for Div."""
    x, y = n.x(0), n.x(1)
    dt = _dtype(x)
    if _dtype(y) != dt:
        raise ShapeError(f"{n.where}: inputs are {dt} and {_dtype(y)}; ONNX needs one dtype")
    fmod = n.attr("fmod", 0)
    if dt not in FLOAT_DTYPES:
        if not isinstance(y, Value):
            e = np.asarray(y.dims if isinstance(y, Sym) else y)
            if any(not isinstance(v, str) and v == 0 for v in e.reshape(-1).tolist()):
                raise ShapeError(f"{n.where}: integer ({dt}) modulo by a constant divisor "
                                 "that holds 0 (ONNX Runtime fails on it)")
        r = cx.op("sub", x, cx.op("mul", cx.op("div", x, y), y))
        if fmod:
            return [r]
        zero = _scalar(0, dt)
        fix = cx.op("logical_and", cx.op("logical_not", cx.op("equal", r, zero)),
                    cx.op("logical_not", cx.op("equal", cx.op("less", r, zero),
                                                   cx.op("less", y, zero))))
        return [cx.op("where", fix, cx.op("add", r, y), r)]
    wide = "f64"
    xw = cx.op("cast", x, dtype=wide) if dt != wide else x
    yw = cx.op("cast", y, dtype=wide) if dt != wide else y
    q = cx.op("div", xw, yw)
    k = lambda v: _scalar(v, wide)  # noqa: E731
    if fmod:   # trunc(q) = sign(q) floor(|q|)
        tq = cx.op("where", cx.op("less", q, k(0)), cx.op("neg", cx.op("floor", cx.op(
            "neg", q))), cx.op("floor", q))
    else:
        tq = cx.op("floor", q)
    r = cx.op("sub", xw, cx.op("mul", tq, yw))
    # y infinite: C fmod gives x; Python's mod gives x where the signs agree (else y)
    inf = cx.op("equal", cx.op("abs", yw), k(np.inf))
    if fmod:
        at_inf = xw
    else:
        same = cx.op("logical_or", cx.op("equal", xw, k(0)), cx.op("equal", cx.op(
            "less", xw, k(0)), cx.op("less", yw, k(0))))
        at_inf = cx.op("where", same, xw, yw)
    finite_x = cx.op("less", cx.op("abs", xw), k(np.inf))
    r = cx.op("where", cx.op("logical_and", inf, finite_x), at_inf, r)
    return [cx.op("cast", r, dtype=dt) if dt != wide else r]


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


def _cumsum(cx, n):
    """CumSum as a matmul with an n x n triangular ones matrix (`full` + `trilu`, so a
    symbolic n works too; integers stay exact), the axis moved last and back. O(n^2):
    fine for position ids; a scan op would serve long axes better."""
    x = n.x(0)
    rank, dt = len(_shape(x)), _dtype(x)
    axis = _check_axes(n, [n.const(1, "axis")], rank)[0]
    d = _shape(x)[axis]
    rev, excl = n.attr("reverse", 0), n.attr("exclusive", 0)
    # y[j] = sum_i x[i] m[i, j]: forward keeps i <= j (upper), reverse i >= j (lower)
    m = cx.op("trilu", cx.op("full", shape=[d, d], value=1, dtype=dt), upper=not rev,
              k=(-1 if rev else 1) if excl else 0)
    perm = [i for i in range(rank) if i != axis] + [axis]
    xt = cx.op("transpose", x, perm=perm) if axis != rank - 1 else x
    y = cx.op("matmul", xt, m)
    back = [perm.index(i) for i in range(rank)]
    return [cx.op("transpose", y, perm=back) if axis != rank - 1 else y]


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
    # constants and shapes
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape_op,
    "Size": _size, "Range": _range, "Identity": _identity, "Dropout": _dropout,
    "Cast": _cast, "CastLike": _cast_like,
    # data movement
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "TensorScatter": _tensor_scatter,
    "Expand": _expand, "Trilu": _trilu, "Where": _where, "OneHot": _one_hot,
    # elementwise
    **{k: _unary(v) for k, v in {
        "Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
        "Reciprocal": "reciprocal", "Tanh": "tanh", "Erf": "erf", "Sigmoid": "sigmoid",
        "Relu": "relu", "Sin": "sin", "Cos": "cos", "Floor": "floor", "Round": "round",
        "Not": "logical_not",
    }.items()},
    **{k: _binary(v) for k, v in {
        "Add": "add", "Sub": "sub", "Mul": "mul", "Equal": "equal",
        "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
        "GreaterOrEqual": "greater_equal", "And": "logical_and", "Or": "logical_or",
    }.items()},
    "Pow": _pow, "Div": _div, "Max": _variadic("maximum"), "Min": _variadic("minimum"),
    "Sum": _variadic("add"), "Mean": _variadic("add", mean=True), "Clip": _clip,
    "Gelu": _gelu, "LeakyRelu": _leaky_relu,
    # contractions, normalisation, reductions
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "Einsum": _einsum,
    "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "ReduceMean": _reduce("reduce_mean"), "ReduceSum": _reduce("reduce_sum", 13),
    "ReduceMax": _reduce("reduce_max"), "ReduceMin": _reduce("reduce_min"),
    "ArgMax": _arg_extreme(False), "ArgMin": _arg_extreme(True),
    "ReduceSumSquare": _reduce("reduce_sum", pre=lambda cx, x: cx.op("mul", x, x)),
    "ReduceL1": _reduce("reduce_sum", pre=lambda cx, x: cx.op("abs", x)),
    "ReduceL2": _reduce("reduce_sum", pre=lambda cx, x: cx.op("mul", x, x),
                        post=lambda cx, y: cx.op("sqrt", y)),
    "ReduceLogSum": _reduce("reduce_sum", post=lambda cx, y: cx.op("log", y)),
    "ReduceLogSumExp": _reduce("reduce_sum", pre=lambda cx, x: cx.op("exp", x),
                               post=lambda cx, y: cx.op("log", y)),
    "RMSNormalization": _rms_norm, "Tile": _tile, "PRelu": _prelu, "Xor": _xor,
    **{k: _composed(fn) for k, fn in COMPOSED.items()},
    # quantization
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear,
    "DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul_integer,
    "ConvInteger": _conv_integer, "QLinearMatMul": _qlinear_matmul,
    "QLinearConv": _qlinear_conv,
    # compositions of existing IR ops
    "Mod": _mod, "GlobalAveragePool": _global_pool("reduce_mean"),
    "GlobalMaxPool": _global_pool("reduce_max"), "Pad": _pad, "CumSum": _cumsum,
    "MaxPool": _max_pool, "AveragePool": _average_pool,
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm,
}
