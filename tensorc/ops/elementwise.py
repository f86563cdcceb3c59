"""Elementwise ops: unary math, broadcasting binary ops, comparisons, where, cast."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..types import FLOAT_DTYPES, TensorType
from .registry import Attr, OpDef, broadcast_shapes, elementwise_flops, register, same_dtype

_erf64 = np.frompyfunc(math.erf, 1, 1)
_erfc64 = np.frompyfunc(math.erfc, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """Exact erf (libm, in float64): numpy has none and the reference must be exact."""
    # np.asarray: on a 0-d input frompyfunc returns a bare Python float
    return np.asarray(_erf64(np.asarray(x, np.float64)), np.float64).astype(np.asarray(x).dtype)


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    else:
        # 1 + erf(x/sqrt2) as erfc(-x/sqrt2): exact in the far negative tail too
        y = 0.5 * x64 * np.asarray(_erfc64(-x64 / math.sqrt(2.0)), np.float64)
    return y.astype(np.asarray(x).dtype)


def _float_unary(t: TensorType, **_) -> TensorType:
    if t.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"expects a float tensor, got {t}")
    return t


def _any_unary(t: TensorType, **_) -> TensorType:
    return t


def _bool_unary(t: TensorType) -> TensorType:
    if t.dtype != "bool":
        raise ShapeError(f"expects a bool tensor, got {t}")
    return t


def _sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


# name: (reference, type rule, flops per element)
UNARY = {
    "neg": (np.negative, _any_unary, 1),
    "abs": (np.abs, _any_unary, 1),
    "exp": (np.exp, _float_unary, 1),
    "log": (np.log, _float_unary, 1),
    "sqrt": (np.sqrt, _float_unary, 1),
    "rsqrt": (lambda x: (1.0 / np.sqrt(x)).astype(x.dtype), _float_unary, 2),
    "reciprocal": (lambda x: (1.0 / x).astype(x.dtype), _float_unary, 1),
    "tanh": (np.tanh, _float_unary, 1),
    "erf": (erf, _float_unary, 1),
    "sigmoid": (_sigmoid, _float_unary, 3),
    "relu": (lambda x: np.maximum(x, x.dtype.type(0)), _any_unary, 1),
    "sin": (np.sin, _float_unary, 1),
    "cos": (np.cos, _float_unary, 1),
    "floor": (np.floor, _float_unary, 1),
    "logical_not": (np.logical_not, _bool_unary, 1),
}

for _name, (_ref, _rule, _cost) in UNARY.items():
    register(OpDef(_name, infer=_rule, reference=_ref, flops=elementwise_flops(_cost),
                   kind="elementwise"))

register(OpDef(
    "gelu", infer=_float_unary, reference=gelu, kind="elementwise",
    attrs={"approximate": Attr("str", "none", choices=("none", "tanh"))},
    flops=elementwise_flops(8),
    doc="x * Phi(x); approximate='tanh' is the GPT-2 form",
))


def _div(a, b):
    if a.dtype.kind in "iu":  # ONNX: integer Div truncates; x / 0 is 0 (as the backends)
        # exact integer arithmetic (a float quotient is wrong past 2**53): floor, then
        # one step toward zero where the signs differ and the division is inexact
        b = np.asarray(b)
        zero = b == 0
        safe = np.where(zero, 1, b).astype(b.dtype)
        with np.errstate(over="ignore"):   # INT_MIN / -1 wraps, as in C on two's complement
            q = np.floor_divide(a, safe)
            q = q + ((q < 0) & (q * safe != a))
        return np.where(zero, 0, q).astype(a.dtype)
    return np.true_divide(a, b)


def _pow(a, b):
    if a.dtype.kind in "iub" and np.any(np.asarray(b) < 0):
        # integers to a negative power, as ONNX Runtime gives them (1 / x**k truncated):
        # 1 for x = 1, +-1 for x = -1, 0 for |x| > 1; and 0 for x = 0 (ORT's value there
        # is undefined), like integer division by zero (numpy raises ValueError instead)
        neg = np.asarray(b) < 0
        q = np.power(a, np.where(neg, 0, b).astype(np.asarray(b).dtype))
        odd = (np.abs(np.asarray(b)) % 2).astype(bool)
        inv = np.where(a == 1, 1, np.where(a == -1, np.where(odd, -1, 1), 0))
        return np.where(neg, inv, q).astype(a.dtype)
    return np.power(a, b)


def _binary(a: TensorType, b: TensorType) -> TensorType:
    return TensorType(broadcast_shapes(a, b), same_dtype(a, b))


def _compare(a: TensorType, b: TensorType) -> TensorType:
    same_dtype(a, b)
    return TensorType(broadcast_shapes(a, b), "bool")


def _logical(a: TensorType, b: TensorType) -> TensorType:
    _bool_unary(a), _bool_unary(b)
    return TensorType(broadcast_shapes(a, b), "bool")


# name: (reference, type rule, commutative)
BINARY = {
    "add": (np.add, _binary, True),
    "sub": (np.subtract, _binary, False),
    "mul": (np.multiply, _binary, True),
    "div": (_div, _binary, False),
    "pow": (_pow, _binary, False),
    "maximum": (np.maximum, _binary, True),
    "minimum": (np.minimum, _binary, True),
    "equal": (np.equal, _compare, True),
    "less": (np.less, _compare, False),
    "less_equal": (np.less_equal, _compare, False),
    "greater": (np.greater, _compare, False),
    "greater_equal": (np.greater_equal, _compare, False),
    "logical_and": (np.logical_and, _logical, True),
    "logical_or": (np.logical_or, _logical, True),
}

for _name, (_ref, _rule, _comm) in BINARY.items():
    register(OpDef(_name, infer=_rule, reference=_ref, inputs=(2, 2),
                   flops=elementwise_flops(1), kind="elementwise", commutative=_comm))


def _where(c: TensorType, a: TensorType, b: TensorType) -> TensorType:
    if c.dtype != "bool":
        raise ShapeError(f"condition must be bool, got {c}")
    return TensorType(broadcast_shapes(c, a, b), same_dtype(a, b))


register(OpDef("where", infer=_where, reference=np.where, inputs=(3, 3),
               flops=elementwise_flops(1), kind="elementwise",
               doc="where(cond, a, b): a where cond is true, else b"))

register(OpDef(
    "cast", infer=lambda t, dtype: TensorType(t.shape, dtype),
    reference=lambda x, dtype: x.astype(TensorType((), dtype).np_dtype),
    attrs={"dtype": Attr("dtype")}, kind="elementwise",
))

register(OpDef(
    "clip", infer=_any_unary, kind="elementwise", flops=elementwise_flops(2),
    reference=lambda x, min=None, max=None: np.clip(x, min, max).astype(x.dtype),
    attrs={"min": Attr("float", None), "max": Attr("float", None)},
))
