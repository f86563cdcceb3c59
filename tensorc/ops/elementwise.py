"""Elementwise ops: unary math, broadcasting binary ops, comparisons, where, cast."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..types import FLOAT_DTYPES, TensorType
from . import vjp
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


# Reverse-mode rules of the unary ops: d(input) from the node's input x, output y and
# output gradient dy (see vjp.py).
def _unary_vjp(rule):
    def vjp(g, node, dys):
        (x,), (y,), (dy,) = node.inputs, node.outputs, dys
        return [rule(g, x, y, dy)]
    return vjp


def _mul(g, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = g.add("mul", out, x)
    return out


def _sign(g, x):
    dt = x.type.dtype
    zero = vjp.const(g, 0, dt)
    return g.add("sub", vjp.as_float(g, g.add("greater", x, zero), dt),
                 vjp.as_float(g, g.add("less", x, zero), dt))


def _erf_grad(g, x, y, dy):   # 2/sqrt(pi) exp(-x^2)
    e = g.add("exp", g.add("neg", g.add("mul", x, x)))
    return _mul(g, dy, vjp.const(g, 2 / math.sqrt(math.pi), x.type.dtype), e)


UNARY_VJP = {
    "neg": lambda g, x, y, dy: g.add("neg", dy),
    "abs": lambda g, x, y, dy: g.add("mul", dy, _sign(g, x)),
    "exp": lambda g, x, y, dy: g.add("mul", dy, y),
    "log": lambda g, x, y, dy: g.add("div", dy, x),
    "sqrt": lambda g, x, y, dy: g.add("div", vjp.scale(g, dy, 0.5), y),
    "rsqrt": lambda g, x, y, dy: _mul(g, vjp.scale(g, dy, -0.5), y, y, y),
    "reciprocal": lambda g, x, y, dy: g.add("neg", _mul(g, dy, y, y)),
    "tanh": lambda g, x, y, dy: g.add("mul", dy, g.add(
        "sub", vjp.const(g, 1, x.type.dtype), g.add("mul", y, y))),
    "erf": _erf_grad,
    "sigmoid": lambda g, x, y, dy: _mul(g, dy, y, g.add(
        "sub", vjp.const(g, 1, x.type.dtype), y)),
    "relu": lambda g, x, y, dy: vjp.mask(g, g.add("greater", x, vjp.const(g, 0, x.type.dtype)),
                                         dy),
    "sin": lambda g, x, y, dy: g.add("mul", dy, g.add("cos", x)),
    "cos": lambda g, x, y, dy: g.add("neg", g.add("mul", dy, g.add("sin", x))),
    "floor": lambda g, x, y, dy: None,   # piecewise constant
    "round": lambda g, x, y, dy: None,
}

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
    "round": (np.rint, _float_unary, 1),   # half to even, as ONNX Round
    "logical_not": (np.logical_not, _bool_unary, 1),
}

for _name, (_ref, _rule, _cost) in UNARY.items():
    register(OpDef(_name, infer=_rule, reference=_ref, flops=elementwise_flops(_cost),
                   kind="elementwise",
                   vjp=_unary_vjp(UNARY_VJP[_name]) if _name in UNARY_VJP else None))


def _gelu_vjp(g, node, dys):
    (x,), (dy,) = node.inputs, dys
    dt = x.type.dtype

    def c(v):
        return vjp.const(g, v, dt)
    if node.attrs["approximate"] == "tanh":
        # y = x/2 (1 + tanh(u)), u = k (x + a x^3): dy/dx = (1+t)/2 + x/2 (1-t^2) k (1 + 3a x^2)
        k, a = math.sqrt(2 / math.pi), 0.044715
        x2 = g.add("mul", x, x)
        t = g.add("tanh", _mul(g, c(k), g.add("add", x, _mul(g, c(a), x2, x))))
        left = g.add("mul", c(0.5), g.add("add", c(1), t))
        du = _mul(g, c(k), g.add("add", c(1), _mul(g, c(3 * a), x2)))
        right = _mul(g, c(0.5), x, g.add("sub", c(1), g.add("mul", t, t)), du)
        return [g.add("mul", dy, g.add("add", left, right))]
    # y = x Phi(x): dy/dx = Phi(x) + x phi(x)
    phi_cdf = _mul(g, c(0.5), g.add("add", c(1), g.add("erf", _mul(g, x, c(1 / math.sqrt(2))))))
    pdf = _mul(g, c(1 / math.sqrt(2 * math.pi)), g.add("exp", _mul(g, c(-0.5), x, x)))
    return [g.add("mul", dy, g.add("add", phi_cdf, g.add("mul", x, pdf)))]


register(OpDef(
    "gelu", infer=_float_unary, reference=gelu, kind="elementwise",
    attrs={"approximate": Attr("str", "none", choices=("none", "tanh"))},
    flops=elementwise_flops(8), vjp=_gelu_vjp,
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



def _binary_vjp(rule):
    """Gradients of a broadcasting binary op, each summed back to its input's shape."""
    def run(g, node, dys):
        (a, b), (y,), (dy,) = node.inputs, node.outputs, dys
        da, db = rule(g, a, b, y, dy)
        return [None if d is None else vjp.sum_to(g, d, x.type)
                for d, x in ((da, a), (db, b))]
    return run


def _pow_grad(g, a, b, y, dy):
    dt = a.type.dtype
    da = _mul(g, dy, b, g.add("pow", a, g.add("sub", b, vjp.const(g, 1, dt))))
    # d/db a^b = a^b log a, taken as 0 where a <= 0 (as PyTorch does at a = 0)
    pos = g.add("greater", a, vjp.const(g, 0, dt))
    safe = g.add("where", pos, a, vjp.const(g, 1, dt))
    db = vjp.mask(g, pos, _mul(g, dy, y, g.add("log", safe)))
    return da, db


def _extreme_grad(pick):
    """max/min: the gradient goes to the chosen input; ties split it evenly."""
    def rule(g, a, b, y, dy):
        dt = a.type.dtype
        half = vjp.scale(g, vjp.as_float(g, g.add("equal", a, b), dt), 0.5)
        wa = g.add("add", vjp.as_float(g, g.add(pick, a, b), dt), half)
        return g.add("mul", dy, wa), g.add("mul", dy, g.add("sub", vjp.const(g, 1, dt), wa))
    return rule


BINARY_VJP = {
    "add": lambda g, a, b, y, dy: (dy, dy),
    "sub": lambda g, a, b, y, dy: (dy, g.add("neg", dy)),
    "mul": lambda g, a, b, y, dy: (g.add("mul", dy, b), g.add("mul", dy, a)),
    "div": lambda g, a, b, y, dy: (g.add("div", dy, b),
                                   g.add("neg", g.add("div", g.add("mul", dy, y), b))),
    "pow": _pow_grad,
    "maximum": _extreme_grad("greater"),
    "minimum": _extreme_grad("less"),
}

for _name, (_ref, _rule, _comm) in BINARY.items():
    register(OpDef(_name, infer=_rule, reference=_ref, inputs=(2, 2),
                   flops=elementwise_flops(1), kind="elementwise", commutative=_comm,
                   vjp=_binary_vjp(BINARY_VJP[_name]) if _name in BINARY_VJP else None))


def _where(c: TensorType, a: TensorType, b: TensorType) -> TensorType:
    if c.dtype != "bool":
        raise ShapeError(f"condition must be bool, got {c}")
    return TensorType(broadcast_shapes(c, a, b), same_dtype(a, b))


def _where_vjp(g, node, dys):
    (c, a, b), (dy,) = node.inputs, dys
    zero = vjp.const(g, 0, dy.type.dtype)
    return [None, vjp.sum_to(g, g.add("where", c, dy, zero), a.type),
            vjp.sum_to(g, g.add("where", c, zero, dy), b.type)]


def _cast_vjp(g, node, dys):
    (x,), (dy,) = node.inputs, dys
    return [g.add("cast", dy, dtype=x.type.dtype) if x.type.dtype in FLOAT_DTYPES else None]


def _clip_vjp(g, node, dys):
    (x,), (dy,) = node.inputs, dys
    lo, hi = node.attrs["min"], node.attrs["max"]
    keep = None
    for bound, op in ((lo, "greater_equal"), (hi, "less_equal")):
        if bound is not None:
            k = g.add(op, x, vjp.const(g, bound, x.type.dtype))
            keep = k if keep is None else g.add("logical_and", keep, k)
    return [dy if keep is None else vjp.mask(g, keep, dy)]


register(OpDef("where", infer=_where, reference=np.where, inputs=(3, 3),
               flops=elementwise_flops(1), kind="elementwise", vjp=_where_vjp,
               doc="where(cond, a, b): a where cond is true, else b"))

register(OpDef(
    "cast", infer=lambda t, dtype: TensorType(t.shape, dtype),
    reference=lambda x, dtype: x.astype(TensorType((), dtype).np_dtype),
    attrs={"dtype": Attr("dtype")}, kind="elementwise", vjp=_cast_vjp,
))

register(OpDef(
    "clip", infer=_any_unary, kind="elementwise", flops=elementwise_flops(2),
    reference=lambda x, min=None, max=None: np.clip(x, min, max).astype(x.dtype),
    attrs={"min": Attr("float", None), "max": Attr("float", None)}, vjp=_clip_vjp,
))
