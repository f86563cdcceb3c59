"""Elementwise rules, and the one home of the transcendental maths (exp, tanh, erf,
gelu) for every target."""

from __future__ import annotations

import math

from ... import kernel_ir as K
from ..kernels import const as _f
from ..program import NotLowerable
from ..views import Lazy, broadcast_to
from .matmul import into_gemm_epilogue

# Numerical Recipes' erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0, with a
# fractional error below 1.2e-7: P's coefficients, lowest power first.
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
         -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _estrin(x: K.Expr, coefs: list[K.Expr]) -> K.Expr:
    """sum(coefs[i] * x^i) by Estrin's scheme: independent pairs, so short dependency
    chains (Horner's serial chain left a degree-9 polynomial latency-bound)."""
    while len(coefs) > 1:
        pairs = [K.binary("add", a, K.binary("mul", b, x))
                 for a, b in zip(coefs[::2], coefs[1::2], strict=False)]
        coefs = pairs + coefs[len(pairs) * 2:]
        x = K.binary("mul", x, x)
    return coefs[0]


def _gelu(x: K.Expr, approximate="none") -> K.Expr:
    """x * Phi(x). In float32, 1 + erf(x/sqrt2) and 1 + tanh(u) cancel for negative x and
    leave few correct digits below x = -3, so: 2 Phi(x) = erfc(-x/sqrt2), with erfc
    written out above, and (1 + tanh(u)) / 2 = sigmoid(2u). float64 keeps libm's erf."""
    t = x.dtype
    if approximate == "tanh":  # u = sqrt(2/pi) (x + 0.044715 x^3)
        two_u = K.binary("mul", K.binary("mul", _f(t, 2 * math.sqrt(2 / math.pi)), x),
                         K.binary("add", _f(t, 1.0), K.binary(
                             "mul", _f(t, 0.044715), K.binary("mul", x, x))))
        return K.binary("mul", x, K.Unary("sigmoid", two_u))
    half = K.binary("mul", _f(t, 0.5), x)
    if t == "f64":
        erf = K.Unary("erf", K.binary("mul", x, _f(t, 1 / math.sqrt(2))))
        return K.binary("mul", half, K.binary("add", _f(t, 1.0), erf))
    z = K.binary("mul", K.Unary("abs", x), _f(t, 1 / math.sqrt(2)))
    s = K.binary("div", _f(t, 1.0), K.binary("add", _f(t, 1.0), K.binary("mul", _f(t, 0.5), z)))
    poly = _estrin(s, [_f(t, c) for c in _ERFC])
    tail = K.binary("mul", s, K.Unary("exp", K.binary("sub", poly, K.binary("mul", z, z))))
    twice_phi = K.Select(K.binary("lt", x, _f(t, 0.0)), tail, K.binary("sub", _f(t, 2.0), tail))
    return K.binary("mul", half, twice_phi)


def _clip(x, min=None, max=None):
    if min is not None:
        x = K.binary("max", x, _f(x.dtype, min))
    if max is not None:
        x = K.binary("min", x, _f(x.dtype, max))
    return x


def _int_safe(op):
    """Integer division by zero traps on x86: divide by 1 there (the reference gives 0)."""
    def fn(a, b):
        if a.dtype in ("f16", "f32", "f64"):
            return K.Binary(op, a, b)
        zero = K.binary("eq", b, _f(b.dtype, 0))
        q = K.Binary(op, a, K.Select(zero, _f(b.dtype, 1), b))
        return K.Select(zero, _f(a.dtype, 0), q)
    return fn


_UNARY = {name: (lambda op: lambda x: K.Unary(op, x))(name) for name in
          ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid",
           "relu", "sin", "cos", "floor")}
_UNARY["logical_not"] = lambda x: K.Unary("not", x)
_BINARY_NAMES = {"add": "add", "sub": "sub", "mul": "mul", "maximum": "max",
                 "minimum": "min", "pow": "pow", "equal": "eq", "less": "lt",
                 "less_equal": "le", "greater": "gt", "greater_equal": "ge",
                 "logical_and": "and", "logical_or": "or"}
_BINARY = {name: (lambda op: lambda a, b: K.Binary(op, a, b))(kop)
           for name, kop in _BINARY_NAMES.items()}
_BINARY["div"] = _int_safe("div")
_FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid", "sin",
               "cos", "floor", "pow", "gelu"}
ELEMENTWISE = {**_UNARY, **_BINARY, "gelu": _gelu, "clip": _clip,
               "where": lambda c, a, b: K.Select(c, a, b),
               "cast": lambda x, dtype: K.Cast(x, dtype) if x.dtype != dtype else x}


def _elementwise(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    if node.op in _FLOAT_ONLY and ins[0].dtype not in ("f32", "f64", "f16"):
        raise NotLowerable(f"{node.op} on {ins[0].dtype}")
    if ins and ins[0].dtype == "f16" or t.dtype == "f16":
        raise NotLowerable("f16 elementwise math (numpy rounds per op)")
    fused = into_gemm_epilogue(lw, node, ins, attrs)
    if fused is not None:
        return [fused]
    args = [broadcast_to(x, t.shape).expr for x in ins]
    return [Lazy(tuple(t.shape), ELEMENTWISE[node.op](*args, **attrs))]


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    **dict.fromkeys(ELEMENTWISE, _elementwise),
}
