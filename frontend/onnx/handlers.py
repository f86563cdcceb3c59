"""The ONNX op handlers: one per op type (the `HANDLERS` table). Each takes the importer
and an `OnnxNode` and returns the node's outputs as entries, building IR ops through
`cx.op`, which folds an op whose inputs are all known (see `importer.py`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
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


def _elems(e: Entry) -> int | None:
    shape = _shape(e)
    return int(np.prod(shape)) if all(isinstance(d, int) for d in shape) else None


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
    """GatherElements as a gather on the flattened data (see `_elements_index`)."""
    data, idx = n.x(0), n.x(1)
    axis = _check_axes(n, [n.attr("axis", 0)], len(_shape(data)))[0]
    flat = cx.op("reshape", data, shape=[dim_product(_shape(data))])
    return [cx.op("gather", flat, _elements_index(cx, idx, _shape(data), axis), axis=0)]


def _elements_index(cx, idx: Entry, shape, axis: int) -> Entry:
    """Linear indices into data of `shape` flattened, for the *Elements ops: `idx`
    gives the coordinate along `axis`, every other coordinate is the element's own
    position in idx (a range)."""
    ishape, rank = _shape(idx), len(shape)
    lin = None
    for d in range(rank):
        if d == axis:
            c = _wrapped(cx, idx, shape[d])
        else:
            c = cx.op("reshape", cx.op("range", start=[0], limit=[ishape[d]]),
                      shape=[1] * d + [ishape[d]] + [1] * (rank - d - 1))
        stride = dim_product(shape[d + 1:])
        c = cx.op("mul", c, _dim(stride, "i64")) if stride != 1 else c
        lin = c if lin is None else cx.op("add", lin, c)
    return lin


def _wrapped(cx, idx: Entry, d) -> Entry:
    """Indices as i64, a negative one counted from the end of a dim of size d."""
    idx = cx.op("cast", idx, dtype="i64") if _dtype(idx) != "i64" else idx
    return cx.op("where", cx.op("less", idx, _scalar(0, "i64")),
                 cx.op("add", idx, _dim(d, "i64")), idx)


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


# --- Mod and CumSum (compositions of existing IR ops) ---------------------------------

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
    # compositions of existing IR ops
    "Mod": _mod, "CumSum": _cumsum,
}
