"""Elementwise rules, and the one home of the transcendental maths (exp, tanh, erf,
gelu) for every target."""

from __future__ import annotations

import math

from ... import kernel_ir as K
from ..kernels import const as _f
from ..program import NotLowerable
from ..views import Lazy, broadcast_to
from .matmul import into_gemm_epilogue

# --- the maths, one home for every target ---------------------------------------------
#
# Each function below builds its formula through `m`, a target's arithmetic: kernel IR
# expressions here (`KernelMath`: gelu inside generated kernels, exp left to the code
# generator), float32 scalars or 16-lane vectors of LLVM IR in backends/llvm (`codegen.py`
# for kernels, the GEMM epilogue and flash attention). `m` offers c(value), add, sub, mul,
# div, fma(a, b, c) = a*b + c, min, max, abs, rint, copysign, lt, isnan, select,
# scale2(y, n) (y * 2^n for an integral float n, the result normal) and exp.

LOG2E = 1.4426950408889634
# exp's range: e^x below -86.6 (2.2e-38, near the smallest normal float32) flushes to 0
# (numpy keeps some digits there: a 1e-38 absolute difference); above 88.7228 it is inf.
_EXP_LO, _EXP_HI = -86.6, 88.7228394
# e^r for |r| <= ln2/2: the Taylor coefficients through r^7 (about 1 ulp), lowest first.
_EXP_P = tuple(1 / math.factorial(i) for i in range(8))
# Numerical Recipes' erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0, with a
# fractional error below 1.2e-7: P's coefficients, lowest power first.
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
         -1.13520398, 1.48851587, -0.82215223, 0.17087277)
_TANH_TAYLOR = (1.0, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925)
_ERF_TAYLOR = tuple(2 / math.sqrt(math.pi) * c
                    for c in (1.0, -1 / 3, 1 / 10, -1 / 42, 1 / 216, -1 / 1320, 1 / 9360))


def poly(m, x, coefs):
    """sum(coefs[i] * x^i) by Estrin's scheme: independent pairs, so short dependency
    chains (Horner's serial chain left a degree-9 polynomial latency-bound)."""
    terms = [m.c(c) for c in coefs]
    while len(terms) > 1:
        pairs = [m.fma(b, x, a) for a, b in zip(terms[::2], terms[1::2], strict=False)]
        terms = pairs + terms[len(pairs) * 2:]
        x = m.mul(x, x)
    return terms[0]


def horner(m, x, coefs):
    """sum(coefs[i] * x^i) with the fewest operations (one fma per coefficient): for exp,
    which runs where many independent evaluations are in flight (attention rows, GEMM
    tiles, vectorised loops), throughput matters more than one chain's latency."""
    acc = m.c(coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = m.fma(acc, x, m.c(c))
    return acc


def exp(m, x):
    """exp, branch-free so loops using it vectorise: 2^n * e^r with |r| <= ln2/2, 2^n
    added to e^r's exponent bits. Flash attention spends most of its non-GEMM time here,
    so it stays this short; NaN stays NaN."""
    xc = m.min(m.max(x, m.c(_EXP_LO)), m.c(_EXP_HI))
    n = m.rint(m.mul(xc, m.c(LOG2E)))
    r = m.fma(n, m.c(-0.693359375), xc)      # ln2 in two parts (Cody-Waite); n * c exact
    r = m.fma(n, m.c(2.12194440e-4), r)
    y = m.scale2(horner(m, r, _EXP_P), n)
    y = m.select(m.lt(x, m.c(_EXP_LO)), m.c(0.0), y)
    y = m.select(m.lt(m.c(_EXP_HI), x), m.c(math.inf), y)
    return m.select(m.isnan(x), x, y)


def tanh(m, x):
    """Taylor series near 0 (no cancellation), 1 - 2/(e^2|x| + 1) elsewhere."""
    ax = m.abs(x)
    small = m.mul(x, poly(m, m.mul(x, x), _TANH_TAYLOR))
    big = m.sub(m.c(1.0), m.div(m.c(2.0), m.add(m.exp(m.mul(ax, m.c(2.0))), m.c(1.0))))
    return m.select(m.lt(ax, m.c(0.4)), small, m.copysign(big, x))


def erfc_pos(m, z):
    """erfc(z) for z >= 0 (Numerical Recipes, above)."""
    t = m.div(m.c(1.0), m.fma(z, m.c(0.5), m.c(1.0)))
    return m.mul(t, m.exp(m.sub(poly(m, t, _ERFC), m.mul(z, z))))


def erf(m, x):
    """Taylor series for |x| < 0.5, 1 - erfc(|x|) beyond (no cancellation there)."""
    ax = m.abs(x)
    small = m.mul(x, poly(m, m.mul(x, x), _ERF_TAYLOR))
    big = m.copysign(m.sub(m.c(1.0), erfc_pos(m, ax)), x)
    return m.select(m.lt(ax, m.c(0.5)), small, big)


def sigmoid(m, x):
    return m.div(m.c(1.0), m.add(m.c(1.0), m.exp(m.sub(m.c(0.0), x))))


def gelu(m, x, approximate="none"):
    """x * Phi(x). In float32, 1 + erf(x/sqrt2) and 1 + tanh(u) cancel for negative x and
    leave few correct digits below x = -3, so: 2 Phi(x) = erfc(-x/sqrt2) and
    (1 + tanh(u)) / 2 = sigmoid(2u). At x = -inf both give NaN, like the reference."""
    if approximate == "tanh":  # u = sqrt(2/pi) (x + 0.044715 x^3)
        u = m.mul(m.fma(m.mul(x, x), m.c(0.044715), m.c(1.0)), x)
        return m.div(x, m.add(m.c(1.0), m.exp(m.mul(u, m.c(-2 * math.sqrt(2 / math.pi))))))
    tail = erfc_pos(m, m.mul(m.abs(x), m.c(1 / math.sqrt(2))))
    twice_phi = m.select(m.lt(x, m.c(0.0)), tail, m.sub(m.c(2.0), tail))
    return m.mul(m.mul(m.c(0.5), x), twice_phi)


class KernelMath:
    """The maths' arithmetic as kernel IR expressions of one float dtype; exp stays the
    kernel IR's own op (each code generator renders it)."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def c(self, value):
        return K.Const(value, self.dtype)

    def fma(self, a, b, c):
        return K.binary("add", K.binary("mul", a, b), c)

    def select(self, cond, a, b):
        return K.Select(cond, a, b)

    def exp(self, x):
        return K.Unary("exp", x)

    def abs(self, x):
        return K.Unary("abs", x)

    def __getattr__(self, name):  # add, sub, mul, div, min, max, lt
        return lambda a, b: K.binary(name, a, b)


def _gelu(x: K.Expr, approximate="none") -> K.Expr:
    """float64 keeps libm's erf (it has the digits); float32 the shared formula."""
    if x.dtype == "f64" and approximate != "tanh":
        erf_ = K.Unary("erf", K.binary("mul", x, _f("f64", 1 / math.sqrt(2))))
        return K.binary("mul", K.binary("mul", _f("f64", 0.5), x),
                        K.binary("add", _f("f64", 1.0), erf_))
    return gelu(KernelMath(x.dtype), x, approximate)


def _clip(x, min=None, max=None):
    if min is not None:
        x = K.binary("max", x, _f(x.dtype, min))
    if max is not None:
        x = K.binary("min", x, _f(x.dtype, max))
    return x


def _int_safe(op):
    """Integer division traps on x86 for x / 0 and for INT_MIN / -1: divide by 1 there
    instead. x / 0 gives 0 (as the reference); x / -1 is -x, which wraps INT_MIN to
    itself (as the reference and two's complement do)."""
    def fn(a, b):
        if a.dtype in ("f16", "f32", "f64"):
            return K.Binary(op, a, b)
        zero = K.binary("eq", b, _f(b.dtype, 0))
        if b.dtype not in ("i8", "i32", "i64"):
            q = K.Binary(op, a, K.Select(zero, _f(b.dtype, 1), b))
            return K.Select(zero, _f(a.dtype, 0), q)
        minus_one = K.binary("eq", b, _f(b.dtype, -1))
        safe = K.Select(K.binary("or", zero, minus_one), _f(b.dtype, 1), b)
        q = K.Select(minus_one, K.Unary("neg", a), K.Binary(op, a, safe))
        return K.Select(zero, _f(a.dtype, 0), q)
    return fn


_UNARY = {name: (lambda op: lambda x: K.Unary(op, x))(name) for name in
          ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid",
           "relu", "sin", "cos", "floor", "round")}
_UNARY["logical_not"] = lambda x: K.Unary("not", x)
_BINARY_NAMES = {"add": "add", "sub": "sub", "mul": "mul", "maximum": "max",
                 "minimum": "min", "pow": "pow", "equal": "eq", "less": "lt",
                 "less_equal": "le", "greater": "gt", "greater_equal": "ge",
                 "logical_and": "and", "logical_or": "or"}
_BINARY = {name: (lambda op: lambda a, b: K.Binary(op, a, b))(kop)
           for name, kop in _BINARY_NAMES.items()}
_BINARY["div"] = _int_safe("div")
_FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid", "sin",
               "cos", "floor", "round", "pow", "gelu"}
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
