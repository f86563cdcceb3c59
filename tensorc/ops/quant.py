"""Quantized arithmetic made explicit: 8-bit integers with a scale and a zero point.

A quantized tensor is a u8 or i8 tensor `q` standing for `(q - zero_point) * scale`.
Scale and zero point broadcast against the tensor the numpy way: rank 0 is per tensor,
`[1, N]` per output column of a `[K, N]` weight, `[..., M, 1]` per row (ONNX's 1-D
per-axis parameters become such shapes at import). The zero point's dtype is the
quantized dtype. Rounding is half to even, as ONNX's QuantizeLinear.

- `quantize(x, scale, zp)`: saturate(round(x / scale) + zp), the zero point's dtype.
- `dequantize(q, scale, zp)`: (q - zp) * scale in f32 (q may be i32 with zp 0).
- `quant_params(x)`: a scale and zero point covering x's range, computed at run time
  (dynamic quantization; ONNX DynamicQuantizeLinear is u8 per tensor).
- `matmul_integer(a, b, a_zp, b_zp)`: (a - a_zp) @ (b - b_zp) accumulated in i32.
- `fake_quantize(x, scale, zp)`: dequantize(quantize(x)) in one op, whose gradient is the
  straight-through estimator (quantization-aware training).

References widen first (numpy's `int8 @ int8` is int8 and wraps).
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..types import TensorType
from . import vjp
from .nn import _matmul
from .registry import Attr, OpDef, broadcast_shapes, elementwise_flops, numel, register

QUANT_RANGE = {"u8": (0, 255), "i8": (-128, 127)}


def _quant_dtype(zp: TensorType, what: str = "zero point") -> str:
    if zp.dtype not in QUANT_RANGE:
        raise ShapeError(f"the {what} must be u8 or i8, got {zp}")
    return zp.dtype


def _check_params(x: TensorType, scale: TensorType, zp: TensorType) -> None:
    if scale.dtype != "f32":
        raise ShapeError(f"the scale must be f32, got {scale}")
    if scale.shape != zp.shape:
        raise ShapeError(f"scale {scale} and zero point {zp} differ in shape")
    if broadcast_shapes(x, scale) != x.shape:
        raise ShapeError(f"scale {scale} does not broadcast to {x}")


def _quantize(x: TensorType, scale: TensorType, zp: TensorType) -> TensorType:
    if x.dtype != "f32":
        raise ShapeError(f"quantize takes f32, got {x}")
    _check_params(x, scale, zp)
    return TensorType(x.shape, _quant_dtype(zp))


def quantize_ref(x, scale, zp):
    lo, hi = QUANT_RANGE[TensorType.of(zp).dtype]
    q = np.rint(x / scale) + zp.astype(np.float32)
    return np.clip(q, lo, hi).astype(zp.dtype)


def _quantize_decompose(graph, inputs) -> list:
    x, scale, zp = inputs
    lo, hi = QUANT_RANGE[zp.type.dtype]
    q = graph.add("add", graph.add("round", graph.add("div", x, scale)),
                  graph.add("cast", zp, dtype="f32"))
    return [graph.add("cast", graph.add("clip", q, min=lo, max=hi), dtype=zp.type.dtype)]


register(OpDef(
    "quantize", infer=_quantize, reference=quantize_ref, inputs=(3, 3),
    flops=elementwise_flops(4), decompose=_quantize_decompose,
    vjp=lambda g, node, dys: [vjp.NoGradient("quantize has an integer output: train "
                                             "through fake_quantize")] + [None, None],
    doc="quantize(x, scale, zero_point): saturate(round_half_even(x / scale) + zero_point) "
        "in the zero point's dtype (u8 or i8); scale and zero point broadcast against x",
))


def _dequantize(q: TensorType, scale: TensorType, zp: TensorType) -> TensorType:
    if q.dtype == "i32":
        if zp.dtype != "i32":
            raise ShapeError(f"an i32 tensor's zero point must be i32, got {zp}")
    elif q.dtype != _quant_dtype(zp):
        raise ShapeError(f"dequantize: {q} with a {zp.dtype} zero point")
    _check_params(q, scale, zp)
    return TensorType(q.shape, "f32")


def dequantize_ref(q, scale, zp):
    wide = q.astype(np.float32) - zp.astype(np.float32)   # exact below 2**24
    return (wide * scale).astype(np.float32)


def _dequantize_decompose(graph, inputs) -> list:
    q, scale, zp = inputs
    wide = graph.add("sub", graph.add("cast", q, dtype="f32"), graph.add("cast", zp, dtype="f32"))
    return [graph.add("mul", wide, scale)]


register(OpDef(
    "dequantize", infer=_dequantize, reference=dequantize_ref, inputs=(3, 3),
    flops=elementwise_flops(2), decompose=_dequantize_decompose,
    vjp=lambda g, node, dys: [None, None, None],   # from an integer: nothing to train
    doc="dequantize(q, scale, zero_point): (q - zero_point) * scale in f32",
))


def _quant_params(x: TensorType, dtype="u8", axes=None):
    if x.dtype != "f32":
        raise ShapeError(f"quant_params takes f32, got {x}")
    axes = range(x.rank) if axes is None else axes
    red = set()
    for a in axes:
        if not -x.rank <= a < x.rank:
            raise ShapeError(f"axis {a} is out of range for {x}")
        red.add(a % x.rank)
    shape = tuple(1 if i in red else d for i, d in enumerate(x.shape))
    return [TensorType(shape, "f32"), TensorType(shape, dtype)]


def quant_params_ref(x, dtype="u8", axes=None):
    axes = None if axes is None else tuple(axes)
    lo, hi = QUANT_RANGE[dtype]
    f32 = np.float32
    if dtype == "u8":   # asymmetric, the range widened to hold 0 (ONNX DynamicQuantizeLinear)
        xmin = np.minimum(np.min(x, axis=axes, keepdims=True, initial=np.inf), f32(0))
        xmax = np.maximum(np.max(x, axis=axes, keepdims=True, initial=-np.inf), f32(0))
        scale = ((xmax - xmin) / f32(hi - lo)).astype(f32)
        scale = np.where(scale == 0, f32(1), scale)   # all zeros: any scale is exact
        zp = np.clip(np.rint(-xmin / scale), lo, hi).astype(np.uint8)
    else:               # symmetric: zero point 0
        amax = np.max(np.abs(x), axis=axes, keepdims=True, initial=f32(0))
        scale = (amax / f32(hi)).astype(f32)
        scale = np.where(scale == 0, f32(1), scale)
        zp = np.zeros(scale.shape, np.int8)
    shape = _quant_params(TensorType.of(x), dtype, axes)[0].shape
    return [scale.reshape(shape), zp.reshape(shape)]


def _quant_params_decompose(graph, inputs, dtype, axes) -> list:
    (x,) = inputs
    lo, hi = QUANT_RANGE[dtype]
    axes = tuple(range(x.type.rank)) if axes is None else tuple(axes)
    zero, one = vjp.const(graph, 0, "f32"), vjp.const(graph, 1, "f32")

    def nonzero(s):
        return graph.add("where", graph.add("equal", s, zero), one, s)
    if dtype == "u8":
        xmin = graph.add("minimum", graph.add("reduce_min", x, axes=axes, keepdims=True), zero)
        xmax = graph.add("maximum", graph.add("reduce_max", x, axes=axes, keepdims=True), zero)
        scale = nonzero(graph.add("div", graph.add("sub", xmax, xmin),
                                  vjp.const(graph, hi - lo, "f32")))
        zp = graph.add("round", graph.add("div", graph.add("neg", xmin), scale))
        zp = graph.add("cast", graph.add("clip", zp, min=lo, max=hi), dtype="u8")
    else:
        amax = graph.add("reduce_max", graph.add("abs", x), axes=axes, keepdims=True)
        scale = nonzero(graph.add("div", graph.add("maximum", amax, zero),
                                  vjp.const(graph, hi, "f32")))
        zp = graph.add("cast", graph.add("mul", scale, zero), dtype="i8")
    return [scale, zp]


register(OpDef(
    "quant_params", infer=_quant_params, reference=quant_params_ref,
    attrs={"dtype": Attr("dtype", "u8", choices=("u8", "i8")), "axes": Attr("ints", None)},
    flops=lambda outs, x, **attrs: 2 * numel(x), decompose=_quant_params_decompose,
    vjp=lambda g, node, dys: [None],   # the range is a constant of the quantization
    doc="a scale and zero point for x, reduced over `axes` (kept as size 1; None: all): "
        "u8 covers [min(x, 0), max(x, 0)] in 255 steps (ONNX DynamicQuantizeLinear), i8 is "
        "symmetric, max|x| / 127 with zero point 0; a zero range gets scale 1",
))


def _fake_quantize(x: TensorType, scale: TensorType, zp: TensorType) -> TensorType:
    _quantize(x, scale, zp)
    return x


def _fake_quantize_vjp(g, node, dys):
    """Straight through where x quantizes inside the range, zero where it saturates."""
    (x, scale, zp), (dy,) = node.inputs, dys
    lo, hi = QUANT_RANGE[zp.type.dtype]
    q = g.add("add", g.add("round", g.add("div", x, scale)), g.add("cast", zp, dtype="f32"))
    keep = g.add("logical_and", g.add("greater_equal", q, vjp.const(g, lo, "f32")),
                 g.add("less_equal", q, vjp.const(g, hi, "f32")))
    return [vjp.mask(g, keep, dy), None, None]


register(OpDef(
    "fake_quantize", infer=_fake_quantize, inputs=(3, 3), flops=elementwise_flops(6),
    reference=lambda x, scale, zp: dequantize_ref(quantize_ref(x, scale, zp), scale, zp),
    decompose=lambda graph, inputs: [graph.add("dequantize", graph.add("quantize", *inputs),
                                               *inputs[1:])],
    vjp=_fake_quantize_vjp,
    doc="dequantize(quantize(x, scale, zp), scale, zp): quantization simulated in f32; "
        "its gradient passes straight through inside the representable range",
))


def _matmul_integer(a: TensorType, b: TensorType, a_zp: TensorType | None = None,
                    b_zp: TensorType | None = None) -> TensorType:
    for t, zp, what in ((a, a_zp, "a"), (b, b_zp, "b")):
        _quant_dtype(t, f"{what} operand")
        if zp is not None:
            if zp.dtype != t.dtype:
                raise ShapeError(f"{what}'s zero point {zp} is not {t.dtype} like {what}")
            if broadcast_shapes(t, zp) != t.shape:
                raise ShapeError(f"{what}'s zero point {zp} does not broadcast to {t}")
    return TensorType(_matmul(a, TensorType(b.shape, a.dtype)).shape, "i32")


def matmul_integer_ref(a, b, a_zp=None, b_zp=None):
    # float64 is exact here: every product and partial sum is an integer below 2**53
    wa = a.astype(np.float64) - (0 if a_zp is None else a_zp.astype(np.float64))
    wb = b.astype(np.float64) - (0 if b_zp is None else b_zp.astype(np.float64))
    return np.matmul(wa, wb).astype(np.int64).astype(np.int32)


def _matmul_integer_decompose(graph, inputs) -> list:
    a, b, *zps = list(inputs) + [None] * (4 - len(inputs))

    def widen(x, zp):
        w = graph.add("cast", x, dtype="i32")
        return w if zp is None else graph.add("sub", w, graph.add("cast", zp, dtype="i32"))
    return [graph.add("matmul", widen(a, zps[0]), widen(b, zps[1]))]


def _matmul_integer_flops(outs, a, b, *zps):
    return 2 * numel(outs[0]) * int(a.shape[-1])


register(OpDef(
    "matmul_integer", infer=_matmul_integer, reference=matmul_integer_ref, inputs=(2, 4),
    flops=_matmul_integer_flops, decompose=_matmul_integer_decompose,
    vjp=lambda g, node, dys: [None] * len(node.inputs),
    doc="(a - a_zero_point) @ (b - b_zero_point) of u8/i8 operands accumulated in i32 "
        "(ONNX MatMulInteger); zero points broadcast against their operand",
))


def dequantize_chain(mm, users, outputs=()) -> list | None:
    """The dequantize after an integer matmul `mm`: a cast to f32, then one or two
    multiplications by scales, as [(node, role)] with role "row" ([..., M, 1]) or
    "column" ([N], [1, N], ...; a one-value scale takes the free role); None if `mm` is
    not followed by that. Both the quantize pass's form (acc * row scale * column scale)
    and ONNX Runtime's (acc * (a_scale * b_scale), per column) fit: the
    `fuse-epilogues` pass makes such a chain one region and lowering the integer GEMM's
    epilogue. `users`: value -> the nodes reading it; `outputs`: values other code reads."""
    acc = mm.outputs[0].type
    chain, cur = [], mm.outputs[0]
    while len(chain) < 3:
        us = users.get(cur, [])
        if len(us) != 1 or cur in outputs:
            break
        u = us[0]
        if not chain:
            if u.op != "cast" or u.attrs["dtype"] != "f32":
                return None
            chain.append((u, "cast"))
        else:
            other = [v for v in u.inputs if v is not cur]
            role = scale_role(other[0].type, acc) if u.op == "mul" and len(other) == 1 \
                else None
            taken = {r for _, r in chain}
            if role == "tensor":
                role = "row" if "row" not in taken else "column"
            if role is None or role in taken:
                break
            chain.append((u, role))
        cur = u.outputs[0]
    return chain[1:] and chain or None


def scale_role(t: TensorType, acc: TensorType) -> str | None:
    """How a scale of type `t` applies to a matrix of type `acc`: "tensor" (one value),
    "row" ([..., M, 1]), "column" ([N], [1, N], ...) or None."""
    if t.dtype != "f32" or t.rank > acc.rank:
        return None
    shape = (1,) * (acc.rank - t.rank) + tuple(t.shape)
    if all(d == 1 for d in shape):
        return "tensor"
    if shape[-1] == 1 and shape[:-1] == tuple(acc.shape[:-1]):
        return "row"
    if shape[-1] == acc.shape[-1] and all(d == 1 for d in shape[:-1]):
        return "column"
    return None
