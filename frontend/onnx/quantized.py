"""The ONNX handlers of quantized ops: QDQ (QuantizeLinear, DequantizeLinear),
DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv, written
with tensorc's quantization ops (`tensorc/ops/quant.py`). The importer's table is
`handlers.HANDLERS` with these."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

from tensorc.errors import ShapeError
from tensorc.ir import TensorType, Value

from .handlers import _check_axes, _elems, _shape
from .values import Entry, _dtype, onnx_dtype

if TYPE_CHECKING:
    from .importer import OnnxNode, _Importer

# --- quantization: QDQ, dynamic quantization, integer and QLinear ops -------------------
# A quantized ONNX parameter (scale, zero point) is a scalar (per tensor) or 1-D along
# `axis` (per axis); the IR's broadcast them numpy-style, so a 1-D one becomes
# [1, .., N, .., 1] at import. Requantization (QLinearMatMul, QLinearConv) is what ONNX
# Runtime computes: saturate(round_half_even(f32(acc) * (a_scale * b_scale / y_scale)) + y_zp).

QUANT_DTYPES = ("u8", "i8")
MAX_INT_CONV_TERMS = 4096   # kernel offsets x groups of an integer conv (one matmul each)


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


HANDLERS: dict[str, Callable[[_Importer, OnnxNode], list[Entry]]] = {
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear,
    "DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul_integer,
    "ConvInteger": _conv_integer, "QLinearMatMul": _qlinear_matmul,
    "QLinearConv": _qlinear_conv,
}
