"""Every op's numpy reference against an independent formula, FLOP counts, and the
type-inference errors a user can hit.

The independent formulas are written differently from the registry on purpose:
Python loops over `np.ndindex`, the `math` module, explicit `np.broadcast_to`, a
hand-built im2col for conv2d. A newly registered op fails
`test_every_op_has_a_reference_check` until it gets an entry in `CHECKS`.
"""

from __future__ import annotations

import math
import operator
import struct
import zlib

import numpy as np
import pytest

import tensorc.passes  # noqa: F401  (passes may register composite ops too)
from tensorc.errors import ShapeError, TensorcError
from tensorc.ir import Graph, TensorType
from tensorc.mesh import Mesh
from tensorc.ops import OPS
from tensorc.ops.collective import COLLECTIVES
from tensorc.ops.shape import SLICE_END
from tensorc.parallel.comm import run_threads

# --- helpers -------------------------------------------------------------------------

NP = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8,
      "i32": np.int32, "i64": np.int64, "u8": np.uint8, "bool": np.bool_}


def rand(rng, shape, dtype="f32", low=-3.0, high=3.0):
    """Random values, never all zero; ints in [low, high], bools about half true."""
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith(("i", "u")):
        return rng.integers(int(low), int(high) + 1, shape).astype(NP[dtype])
    return rng.uniform(low, high, shape).astype(NP[dtype])


def map_elements(fn, *arrays, dtype):
    """fn applied to Python scalars, after broadcasting the inputs explicitly."""
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    full = [np.broadcast_to(a, shape) for a in arrays]
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        out[idx] = fn(*(a[idx].item() for a in full))
    return out.astype(NP[dtype]) if shape else np.asarray(out[()], NP[dtype])


def refill(x, shape):
    """x's elements in row-major order poured into `shape` (reshape without reshape)."""
    flat = [x[idx] for idx in np.ndindex(*x.shape)]
    out = np.empty(shape, x.dtype)
    for k, idx in enumerate(np.ndindex(*shape)):
        out[idx] = flat[k]
    return out


def rows(x, axes):
    """Yield (index template, positions) for every fibre of `x` along `axes`."""
    axes = sorted({a % x.ndim for a in axes}) if x.ndim else []
    keep = [i for i in range(x.ndim) if i not in axes]
    for outer in np.ndindex(*(x.shape[i] for i in keep)):
        positions = []
        for inner in np.ndindex(*(x.shape[a] for a in axes)):
            full = [0] * x.ndim
            for i, v in zip(keep, outer, strict=True):
                full[i] = v
            for a, v in zip(axes, inner, strict=True):
                full[a] = v
            positions.append(tuple(full))
        yield outer, positions


def map_rows(x, axis, fn, dtype):
    """Apply `fn(list) -> list` to every fibre along `axis`, same shape out."""
    out = np.empty(x.shape, np.float64)
    for _, pos in rows(x, [axis]):
        for p, v in zip(pos, fn([float(x[p]) for p in pos]), strict=True):
            out[p] = v
    return out.astype(NP[dtype])


CHECKS = {}


def checks(*ops):
    """Register a generator of (inputs, attrs, expected outputs) for `ops`."""
    def deco(fn):
        for op in ops:
            CHECKS[op] = fn
        return fn
    return deco


def run_op(op, inputs, attrs):
    """Build a one-node graph (type inference), run the reference, check that each
    output has the inferred type; returns the outputs."""
    g = Graph("t")
    vals = [g.add_input(f"x{i}", TensorType.of(np.asarray(a))) for i, a in enumerate(inputs)]
    outs = g.add_node(op, vals, attrs)
    got = OPS[op].evaluate([np.asarray(a) for a in inputs], outs[0].producer.attrs)
    assert len(got) == len(outs)
    for v, a in zip(outs, got, strict=True):
        assert TensorType.of(a) == v.type, f"{op}: reference gives {TensorType.of(a)}, " \
                                           f"inference says {v.type}"
    return got


TOL = {np.float16: (2e-3, 2e-3), np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12)}


def assert_matches(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"got {got.dtype}{got.shape}, expected {expected.dtype}{expected.shape}"
    if got.dtype.kind == "f":
        rtol, atol = TOL[got.dtype.type]
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64),
                                   rtol=rtol, atol=atol)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("op", sorted(OPS))
def test_reference_matches_independent_formula(op):
    assert op in CHECKS, f"op {op!r} has no independent reference check in tests/test_ops.py"
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    cases = list(CHECKS[op](op, rng))
    assert len(cases) >= 3, f"{op}: too few cases"
    if op in COLLECTIVES:   # cases run on a mesh of thread ranks: (size, per rank fn)
        for size, on_rank, expected in cases:
            for got, want in zip(run_threads(Mesh(tp=size), on_rank), expected, strict=True):
                for g, e in zip(got, want, strict=True):
                    assert_matches(g, np.asarray(e))
        return
    for inputs, attrs, expected in cases:
        expected = expected if isinstance(expected, list) else [expected]
        got = run_op(op, inputs, attrs)
        for g, e in zip(got, expected, strict=True):
            assert_matches(g, np.asarray(e))


def test_every_op_has_a_reference_check():
    missing = sorted(set(OPS) - set(CHECKS))
    assert not missing, f"ops without an independent reference check: {missing}"
    stale = sorted(set(CHECKS) - set(OPS))
    assert not stale, f"checks for ops that are not registered: {stale}"


ODD_SHAPES = [(), (1,), (17,), (3, 17), (2, 1, 3)]

# --- elementwise ---------------------------------------------------------------------

UNARY_MATH = {
    "neg": lambda v: -v,
    "abs": abs,
    "exp": math.exp,
    "log": math.log,
    "sqrt": math.sqrt,
    "rsqrt": lambda v: 1.0 / math.sqrt(v),
    "reciprocal": lambda v: 1.0 / v,
    "tanh": math.tanh,
    "erf": math.erf,
    "sigmoid": lambda v: 1.0 / (1.0 + math.exp(-v)),
    "relu": lambda v: v if v > 0 else 0 * v,
    "sin": math.sin,
    "cos": math.cos,
    "floor": math.floor,
    "round": round,   # Python rounds half to even
}
POSITIVE_ONLY = {"log", "sqrt", "rsqrt", "reciprocal"}
INT_OK = {"neg", "abs", "relu"}


@checks(*UNARY_MATH)
def _unary(op, rng):
    low = 0.05 if op in POSITIVE_ONLY else -4.0
    for shape in ODD_SHAPES:
        x = rand(rng, shape, "f32", low, 4.0)
        yield [x], {}, map_elements(UNARY_MATH[op], x, dtype="f32")
    x = rand(rng, (3, 17), "f64", low, 4.0)
    yield [x], {}, map_elements(UNARY_MATH[op], x, dtype="f64")
    if op in INT_OK:
        x = rand(rng, (3, 17), "i64", -9, 9)
        yield [x], {}, map_elements(UNARY_MATH[op], x, dtype="i64")


@checks("logical_not")
def _logical_not(op, rng):
    for shape in ODD_SHAPES:
        x = rand(rng, shape, "bool")
        yield [x], {}, map_elements(lambda v: not v, x, dtype="bool")


def _gelu_exact(v):
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


@checks("gelu")
def _gelu(op, rng):
    for shape in ODD_SHAPES:
        x = rand(rng, shape, "f32", -5, 5)
        yield [x], {}, map_elements(_gelu_exact, x, dtype="f32")
        yield [x], {"approximate": "tanh"}, map_elements(_gelu_tanh, x, dtype="f32")
    x = np.array([1.0, -1.0, 0.0], np.float64)  # anchors: gelu(1) = Phi(1) = 0.8413447...
    yield [x], {}, np.array([0.8413447460685429, -0.15865525393145707, 0.0])


def _trunc_div(a, b):
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


BINARY_PY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": operator.pow,
    "maximum": max,
    "minimum": min,
    "equal": operator.eq,
    "less": operator.lt,
    "less_equal": operator.le,
    "greater": operator.gt,
    "greater_equal": operator.ge,
}
COMPARISONS = {"equal", "less", "less_equal", "greater", "greater_equal"}
BROADCAST_PAIRS = [((3, 17), (3, 17)), ((3, 1), (1, 17)), ((17,), (3, 17)), ((), (2, 3)),
                   ((1,), (1,)), ((2, 1, 3), (17, 1))]


@checks(*BINARY_PY)
def _binary(op, rng):
    fn = BINARY_PY[op]
    out = "bool" if op in COMPARISONS else None
    for sa, sb in BROADCAST_PAIRS:
        if op in COMPARISONS:  # integer-valued floats, so that ties happen
            a = rng.integers(-2, 3, sa).astype(np.float32)
            b = rng.integers(-2, 3, sb).astype(np.float32)
        elif op == "pow":
            a, b = rand(rng, sa, "f32", 0.1, 3), rand(rng, sb, "f32", -2, 2)
        elif op == "div":
            a = rand(rng, sa, "f32")
            b = rand(rng, sb, "f32", 0.5, 3) * rng.choice([-1, 1], sb).astype(np.float32)
        else:
            a, b = rand(rng, sa, "f32"), rand(rng, sb, "f32")
        yield [a, b], {}, map_elements(fn, a, b, dtype=out or "f32")
    # integers: division truncates toward zero (ONNX), pow with small exponents
    a = rand(rng, (3, 17), "i64", -20, 20)
    b = rand(rng, (17,), "i64", 1, 6) * rng.choice([-1, 1], 17)
    if op == "pow":
        a, b = rand(rng, (3, 17), "i64", -5, 5), rand(rng, (17,), "i64", 0, 3)
    int_fn = _trunc_div if op == "div" else fn
    yield [a, b], {}, map_elements(int_fn, a, b, dtype=out or "i64")


@checks("logical_and", "logical_or")
def _logical(op, rng):
    fn = (lambda a, b: a and b) if op == "logical_and" else (lambda a, b: a or b)
    for sa, sb in BROADCAST_PAIRS:
        a, b = rand(rng, sa, "bool"), rand(rng, sb, "bool")
        yield [a, b], {}, map_elements(fn, a, b, dtype="bool")


@checks("where")
def _where(op, rng):
    for sc, sa, sb, dtype in [((3, 17), (3, 17), (3, 17), "f32"), ((3, 1), (1, 17), (17,), "f32"),
                              ((), (2, 3), (3,), "i64"), ((2, 1, 1), (1,), (3, 1), "f32")]:
        c, a, b = rand(rng, sc, "bool"), rand(rng, sa, dtype), rand(rng, sb, dtype)
        yield [c, a, b], {}, map_elements(lambda c, a, b: a if c else b, c, a, b, dtype=dtype)


def _to_f16(v):
    return struct.unpack("<e", struct.pack("<e", v))[0]


@checks("cast")
def _cast(op, rng):
    x = rand(rng, (3, 17), "f32", -3.9, 3.9)
    yield [x], {"dtype": "i32"}, map_elements(int, x, dtype="i32")  # truncates toward 0
    x = x.copy()
    x[0, :5] = 0.0
    yield [x], {"dtype": "bool"}, map_elements(bool, x, dtype="bool")
    yield [x], {"dtype": "f16"}, map_elements(_to_f16, x, dtype="f16")
    b = rand(rng, (17,), "bool")
    yield [b], {"dtype": "f32"}, map_elements(float, b, dtype="f32")
    i = rand(rng, (1,), "i64", -300, 300)
    yield [i], {"dtype": "f64"}, map_elements(float, i, dtype="f64")
    i = rand(rng, (3, 17), "i64", -300, 300)
    yield [i], {"dtype": "i8"}, map_elements(lambda v: (v + 128) % 256 - 128, i, dtype="i8")


@checks("clip")
def _clip(op, rng):
    for shape in ODD_SHAPES:
        x = rand(rng, shape, "f32")
        yield [x], {"min": -1.0, "max": 2.0}, map_elements(
            lambda v: min(max(v, -1.0), 2.0), x, dtype="f32")
    x = rand(rng, (3, 17), "f32")
    yield [x], {"min": 0.5}, map_elements(lambda v: max(v, 0.5), x, dtype="f32")
    yield [x], {"max": -0.5}, map_elements(lambda v: min(v, -0.5), x, dtype="f32")


# --- contractions, reductions, normalisation ----------------------------------------

def matmul_loops(a, b):
    a2 = a if a.ndim > 1 else a[None, :]
    b2 = b if b.ndim > 1 else b[:, None]
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    A = np.broadcast_to(a2, batch + a2.shape[-2:])
    B = np.broadcast_to(b2, batch + b2.shape[-2:])
    (m, k), n = a2.shape[-2:], b2.shape[-1]
    add = math.fsum if a.dtype.kind == "f" else sum
    out = np.empty(batch + (m, n), object)
    for idx in np.ndindex(*batch):
        for i in range(m):
            for j in range(n):
                out[idx + (i, j)] = add(A[idx + (i, p)].item() * B[idx + (p, j)].item()
                                        for p in range(k))
    if a.ndim == 1:
        out = out[..., 0, :]
    if b.ndim == 1:
        out = out[..., 0]
    return np.asarray(out.astype(a.dtype))


@checks("matmul")
def _matmul(op, rng):
    for sa, sb in [((3, 17), (17, 1)), ((1, 5), (5, 3)), ((2, 3, 5), (5, 4)),
                   ((2, 1, 3, 5), (4, 5, 3)), ((5,), (5, 3)), ((2, 3, 5), (5,)),
                   ((17,), (17,))]:
        a, b = rand(rng, sa), rand(rng, sb)
        yield [a, b], {}, matmul_loops(a, b)
    a, b = rand(rng, (3, 4), "i64", -9, 9), rand(rng, (4, 2), "i64", -9, 9)
    yield [a, b], {}, matmul_loops(a, b)


def reduce_loops(x, axes, keepdims, fn):
    axes = range(x.ndim) if axes is None else axes
    red = sorted({a % x.ndim for a in axes}) if x.ndim else []
    keep_shape = tuple(d for i, d in enumerate(x.shape) if i not in red)
    out = np.empty(keep_shape, object)
    for outer, pos in rows(x, red):
        out[outer] = fn([x[p].item() for p in pos])
    out = np.asarray(out.astype(x.dtype))
    if keepdims:
        out = refill(out, tuple(1 if i in red else d for i, d in enumerate(x.shape)))
    return out


REDUCERS = {"reduce_sum": math.fsum, "reduce_mean": lambda v: math.fsum(v) / len(v),
            "reduce_max": max, "reduce_min": min}
REDUCE_CASES = [((2, 3, 5), (0, 2), True), ((2, 3, 5), (-1,), False), ((17,), None, False),
                ((3, 17), (1,), True), ((3, 17), (0, 1), False), ((), None, False),
                ((1, 3, 1), (0, -1), False)]


@checks(*REDUCERS)
def _reduce(op, rng):
    for shape, axes, keepdims in REDUCE_CASES:
        x = rand(rng, shape)
        yield [x], {"axes": axes, "keepdims": keepdims}, reduce_loops(x, axes, keepdims,
                                                                    REDUCERS[op])
    if op != "reduce_mean":
        x = rand(rng, (3, 17), "i64", -50, 50)
        fn = sum if op == "reduce_sum" else REDUCERS[op]
        yield [x], {"axes": (1,)}, reduce_loops(x, (1,), False, fn)


@checks("reduce_prod")
def _reduce_prod(op, rng):
    for shape, axes, keepdims in REDUCE_CASES:
        x = rand(rng, shape, low=-1.5, high=1.5)
        yield [x], {"axes": axes, "keepdims": keepdims}, reduce_loops(x, axes, keepdims,
                                                                    math.prod)
    x = rand(rng, (3, 5), "i64", -3, 3)   # zeros and negatives: a real product
    yield [x], {"axes": (1,)}, reduce_loops(x, (1,), False, math.prod)
    yield [np.zeros((2, 0), np.float32)], {"axes": (1,)}, np.ones(2, np.float32)


@checks("topk")
def _topk(op, rng):
    """A selection by repeated scan: the best value not yet taken, the first such index
    winning ties (the same order as sorting with ties lower index first)."""
    for shape, k, axis, largest, dtype in [((3, 7), 3, -1, True, "f32"),
                                           ((3, 7), 7, 1, False, "f32"),
                                           ((5, 2, 4), 2, 0, True, "i64"),
                                           ((2, 6, 3), 0, 1, True, "f32"),
                                           ((9,), 4, 0, False, "i32")]:
        x = rand(rng, shape, dtype, -2, 2)   # small ints: many ties
        if dtype == "f32":
            x = np.round(x)
        ax = axis % x.ndim
        vals = np.empty(shape[:ax] + (k,) + shape[ax + 1:], x.dtype)
        idx = np.empty(vals.shape, np.int64)
        for outer, pos in rows(x, [ax]):
            row, taken = [x[p].item() for p in pos], []
            for t in range(k):
                left = [i for i in range(len(row)) if i not in taken]
                best = (max if largest else min)(left, key=row.__getitem__)
                taken.append(best)
                at = outer[:ax] + (t,) + outer[ax:]
                vals[at], idx[at] = row[best], best
        yield [x], {"k": k, "axis": axis, "largest": largest}, [vals, idx]


@checks("scatter")
def _scatter(op, rng):
    """Element by element in index order: written (none: the last write wins) or
    combined with what is there."""
    combine = {"none": lambda old, new: new, "add": operator.add, "mul": operator.mul,
               "max": max, "min": min}
    for red in combine:
        for ds, axis, idx in [((5, 3), 0, np.array([4, 0, -1, 4], np.int64)),
                              ((3, 6), 1, np.array([[5, 0], [5, 1]], np.int32)),
                              ((2, 3, 4), -1, np.array(2, np.int64))]:
            data = rand(rng, ds)
            ax = axis % data.ndim
            upd = rand(rng, ds[:ax] + idx.shape + ds[ax + 1:])
            out = data.astype(np.float64)
            for o in np.ndindex(*upd.shape):
                at = o[:ax] + (int(idx[o[ax:ax + idx.ndim]]) % ds[ax],) + o[ax + idx.ndim:]
                out[at] = combine[red](out[at], float(upd[o]))
            yield [data, idx, upd], {"axis": axis, "reduction": red}, out.astype(np.float32)


@checks("argmax")
def _argmax(op, rng):
    def first_max(v):
        return max(range(len(v)), key=v.__getitem__)  # the first of equal maxima
    for shape, axis, keepdims in [((3, 17), -1, False), ((3, 17), 0, True), ((2, 3, 5), 1, False),
                                  ((1,), 0, False)]:
        x = rand(rng, shape)
        exp = reduce_loops(x, (axis,), keepdims, first_max).astype(np.int64)
        yield [x], {"axis": axis, "keepdims": keepdims}, exp
    x = rand(rng, (4, 17), "i64", 0, 2)  # many ties
    yield [x], {}, reduce_loops(x, (-1,), False, first_max).astype(np.int64)


def _softmax_row(v):
    m = max(v)
    e = [math.exp(t - m) for t in v]
    s = math.fsum(e)
    return [t / s for t in e]


def _log_softmax_row(v):
    m = max(v)
    lse = m + math.log(math.fsum(math.exp(t - m) for t in v))
    return [t - lse for t in v]


@checks("softmax", "log_softmax")
def _softmax(op, rng):
    fn = _softmax_row if op == "softmax" else _log_softmax_row
    for shape, axis in [((3, 17), -1), ((3, 17), 0), ((2, 3, 5), 1), ((1,), 0), ((2, 1), -1)]:
        x = rand(rng, shape, "f32", -8, 8)
        yield [x], {"axis": axis}, map_rows(x, axis, fn, "f32")
    x = np.array([[1000.0, 0.0, -1000.0]], np.float32)  # must not overflow
    yield [x], {}, map_rows(x, -1, fn, "f32")


def layer_norm_loops(x, w, b, axis, eps):
    axes = list(range(axis % x.ndim, x.ndim))
    tail = x.shape[axes[0]:]
    w = np.broadcast_to(np.ones(()) if w is None else w, tail)
    b = np.broadcast_to(np.zeros(()) if b is None else b, tail)
    out = np.empty(x.shape, np.float64)
    for outer, pos in rows(x, axes):
        v = [float(x[p]) for p in pos]
        mean = math.fsum(v) / len(v)
        var = math.fsum((t - mean) ** 2 for t in v) / len(v)
        for p, t in zip(pos, v, strict=True):
            inner = p[len(outer):]
            out[p] = (t - mean) / math.sqrt(var + eps) * w[inner] + b[inner]
    return out.astype(x.dtype)


@checks("layer_norm")
def _layer_norm(op, rng):
    for xs, ws, bs, axis, eps in [((3, 17), (17,), (17,), -1, 1e-5),
                                  ((2, 3, 5), (3, 5), (5,), -2, 1e-5),
                                  ((1, 17), None, None, -1, 1e-5),
                                  ((2, 17), (17,), None, 1, 1e-3),
                                  ((3, 1), (1,), (1,), -1, 1e-5)]:
        x = rand(rng, xs)
        w = None if ws is None else rand(rng, ws, "f32", 0.5, 1.5)
        b = None if bs is None else rand(rng, bs)
        ins = [t for t in (x, w, b) if t is not None]
        yield ins, {"axis": axis, "eps": eps}, layer_norm_loops(x, w, b, axis, eps)


def conv2d_im2col(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    n, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    top, left, bottom, right = pads
    xp = np.zeros((n, c, h + top + bottom, wd + left + right))
    xp[:, :, top:top + h, left:left + wd] = x
    oh = (h + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    og = o // group
    y = np.empty((n, o, oh, ow))
    for g in range(group):
        cols = np.empty((n, oh * ow, ci * kh * kw))  # one row per output pixel
        for i in range(oh):
            for j in range(ow):
                col = 0
                for ch in range(g * ci, (g + 1) * ci):
                    for p in range(kh):
                        for q in range(kw):
                            cols[:, i * ow + j, col] = xp[:, ch, i * strides[0] + p * dilations[0],
                                                          j * strides[1] + q * dilations[1]]
                            col += 1
        kernel = w[g * og:(g + 1) * og].astype(np.float64).reshape(og, ci * kh * kw)
        y[:, g * og:(g + 1) * og] = np.transpose(cols @ kernel.T, (0, 2, 1)).reshape(n, og, oh, ow)
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y.astype(x.dtype)


@checks("conv2d")
def _conv2d(op, rng):
    for xs, ws, bias, attrs in [
        ((1, 3, 7, 7), (4, 3, 3, 3), True, {}),
        ((2, 3, 9, 8), (5, 3, 3, 2), True, {"strides": (2, 3), "pads": (1, 0, 2, 1)}),
        ((1, 2, 11, 9), (3, 2, 3, 3), False, {"dilations": (2, 1), "pads": (1, 1, 1, 1)}),
        ((2, 4, 5, 6), (6, 2, 3, 1), True, {"group": 2}),
        ((1, 1, 1, 1), (1, 1, 1, 1), False, {}),
        ((1, 3, 17, 17), (2, 3, 4, 4), True, {"strides": (4, 4)}),
    ]:
        x, w = rand(rng, xs), rand(rng, ws)
        b = rand(rng, (ws[0],)) if bias else None
        yield [t for t in (x, w, b) if t is not None], attrs, conv2d_im2col(x, w, b, **attrs)


# --- data movement ------------------------------------------------------------------

@checks("reshape")
def _reshape(op, rng):
    for xs, target in [((3, 17), (17, 3)), ((2, 3, 5), (-1, 5)), ((1,), ()),
                       ((17,), (1, 17, 1)), ((2, 3, 4), (4, -1, 2))]:
        x = rand(rng, xs)
        known = math.prod(d for d in target if d != -1)
        shape = tuple(math.prod(xs) // known if d == -1 else d for d in target)
        yield [x], {"shape": target}, refill(x, shape)


@checks("transpose")
def _transpose(op, rng):
    for xs, perm in [((3, 17), None), ((2, 3, 5), (1, 2, 0)), ((1, 3, 1, 17), (3, 0, 2, 1)),
                     ((17,), (0,)), ((2, 3, 4), None)]:
        x = rand(rng, xs)
        perm_ = tuple(reversed(range(x.ndim))) if perm is None else perm
        out = np.empty(tuple(xs[p] for p in perm_), x.dtype)
        for idx in np.ndindex(*out.shape):
            src = [0] * x.ndim
            for k, p in enumerate(perm_):
                src[p] = idx[k]
            out[idx] = x[tuple(src)]
        yield [x], {"perm": perm}, out


@checks("concat")
def _concat(op, rng):
    for shapes, axis, dtype in [([(3, 17), (2, 17)], 0, "f32"),
                                ([(3, 1), (3, 17), (3, 5)], -1, "f32"),
                                ([(2, 3, 5)], 1, "i64"),
                                ([(3, 0), (3, 2)], 1, "f32"),
                                ([(2, 1, 3), (2, 2, 3), (2, 1, 3)], 1, "bool")]:
        xs = [rand(rng, s, dtype) for s in shapes]
        ax = axis % len(shapes[0])
        total = list(shapes[0])
        total[ax] = sum(s[ax] for s in shapes)
        out = np.empty(tuple(total), NP[dtype])
        offset = 0
        for x in xs:
            for idx in np.ndindex(*x.shape):
                dst = list(idx)
                dst[ax] += offset
                out[tuple(dst)] = x[idx]
            offset += x.shape[ax]
        yield xs, {"axis": axis}, out


@checks("split")
def _split(op, rng):
    for xs, axis, sizes in [((17,), 0, (5, 12)), ((3, 17), 0, (1, 1, 1)),
                            ((2, 3, 6), -1, (2, 0, 4)), ((1, 3), 1, (3,))]:
        x = rand(rng, xs)
        ax = axis % x.ndim
        outs, offset = [], 0
        for s in sizes:
            shape = list(xs)
            shape[ax] = s
            piece = np.empty(tuple(shape), x.dtype)
            for idx in np.ndindex(*shape):
                src = list(idx)
                src[ax] += offset
                piece[idx] = x[tuple(src)]
            outs.append(piece)
            offset += s
        yield [x], {"axis": axis, "sizes": sizes}, outs


def slice_loops(x, starts, ends, axes, steps):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    picks = [list(range(n)) for n in x.shape]
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        picks[a] = list(range(*slice(s, e, st).indices(x.shape[a])))
    out = np.empty(tuple(len(p) for p in picks), x.dtype)
    for idx in np.ndindex(*out.shape):
        out[idx] = x[tuple(p[i] for p, i in zip(picks, idx, strict=True))]
    return out


@checks("slice")
def _slice(op, rng):
    for xs, attrs in [
        ((17,), {"starts": (2,), "ends": (15,), "steps": (3,)}),
        ((3, 17), {"starts": (-2, 1), "ends": (SLICE_END, -1)}),
        ((2, 3, 17), {"starts": (1,), "ends": (100,), "axes": (-1,), "steps": (2,)}),
        ((3, 17), {"starts": (5,), "ends": (2,), "axes": (1,)}),
        ((3, 17), {"starts": (0, 1), "ends": (4, 3), "axes": (1, 0)}),
        ((17,), {"starts": (-1,), "ends": (-100,), "steps": (-1,)}),
        ((1,), {"starts": (0,), "ends": (1,)}),
    ]:
        x = rand(rng, xs)
        yield [x], attrs, slice_loops(x, attrs["starts"], attrs["ends"], attrs.get("axes"),
                                      attrs.get("steps"))


@checks("expand")
def _expand(op, rng):
    for xs, shape in [((3, 1), (3, 17)), ((17,), (2, 3, 17)), ((1,), (1,)), ((3, 1), (2, 1, 1)),
                      ((), (3,))]:
        x = rand(rng, xs)
        rank = max(len(xs), len(shape))
        px = (1,) * (rank - len(xs)) + xs
        ps = (1,) * (rank - len(shape)) + tuple(shape)
        out_shape = tuple(max(a, b) for a, b in zip(px, ps, strict=True))
        xr = refill(x, px)
        out = np.empty(out_shape, x.dtype)
        for idx in np.ndindex(*out_shape):
            out[idx] = xr[tuple(0 if px[k] == 1 else i for k, i in enumerate(idx))]
        yield [x], {"shape": shape}, out


@checks("squeeze")
def _squeeze(op, rng):
    for xs, axes in [((1, 3, 1, 17), (0, 2)), ((1,), (0,)), ((3, 1), (-1,)), ((1, 1), (1,))]:
        x = rand(rng, xs)
        drop = {a % len(xs) for a in axes}
        yield [x], {"axes": axes}, refill(x, tuple(d for i, d in enumerate(xs) if i not in drop))


@checks("unsqueeze")
def _unsqueeze(op, rng):
    for xs, axes, shape in [((3, 17), (0,), (1, 3, 17)), ((3, 17), (-1,), (3, 17, 1)),
                            ((3, 17), (0, 3), (1, 3, 17, 1)), ((), (0,), (1,)),
                            ((3,), (-1, 0), (1, 3, 1))]:
        x = rand(rng, xs)
        yield [x], {"axes": axes}, refill(x, shape)


@checks("gather")
def _gather(op, rng):
    for ds, axis, idx in [((5, 3), 0, np.array([4, 0, -1, 2], np.int64)),
                          ((3, 17), 1, np.array([[16, 0], [-17, 3]], np.int32)),
                          ((17,), 0, np.array(3, np.int64)),
                          ((2, 3, 5), -1, np.array([1], np.int64))]:
        data = rand(rng, ds)
        ax = axis % data.ndim
        shape = ds[:ax] + idx.shape + ds[ax + 1:]
        out = np.empty(shape, data.dtype)
        for o in np.ndindex(*shape):
            i = o[ax:ax + idx.ndim]
            pick = int(idx[i]) % ds[ax]
            out[o] = data[o[:ax] + (pick,) + o[ax + idx.ndim:]]
        yield [data, idx], {"axis": axis}, out


def test_gather_out_of_range_is_an_error():
    with pytest.raises(TensorcError, match="index 5 is out of range for an axis of size 5"):
        OPS["gather"].evaluate([np.zeros((5, 2), np.float32), np.array([5])], {"axis": 0})


@checks("tensor_scatter")
def _tensor_scatter(op, rng):
    for cs, us, axis, idx in [((2, 3, 7, 4), (2, 3, 2, 4), -2, [0, 5]),
                              ((1, 2, 5, 3), (1, 2, 5, 3), 2, [0]),
                              ((3, 6, 2), (3, 1, 2), 1, np.array([5, 0, 2], np.int32)),
                              ((2, 4, 5), (2, 4, 1), -1, [4, 0])]:
        cache, update = rand(rng, cs), rand(rng, us)
        idx = np.asarray(idx, np.int64) if isinstance(idx, list) else idx
        ax = axis % len(cs)
        out = cache.copy()
        for b in range(cs[0]):          # element by element: out[b, ..., idx[b] + i, ...]
            for o in np.ndindex(*us[1:]):
                dst = list(o)
                dst[ax - 1] += int(idx[b])
                out[(b, *dst)] = update[(b, *o)]
        yield [cache, update, idx], {"axis": axis}, out


def test_tensor_scatter_rows_must_fit():
    cache, update = np.zeros((2, 8, 3), np.float32), np.ones((2, 2, 3), np.float32)
    for idx in ([0, 7], [-1, 0]):
        with pytest.raises(TensorcError, match="does not leave room for 2 rows in an axis "
                                               "of 8"):
            OPS["tensor_scatter"].evaluate([cache, update, np.array(idx)], {"axis": 1})


@checks("full")
def _full(op, rng):
    for shape, value, dtype in [((3, 17), 1.5, "f32"), ((), 7, "i64"), ((2, 1), True, "bool"),
                                ((0,), -2.0, "f64"), ((17,), -0.0, "f32")]:
        out = np.empty(shape, NP[dtype])
        for idx in np.ndindex(*shape):
            out[idx] = value
        yield [], {"shape": shape, "value": value, "dtype": dtype}, out


@checks("trilu")
def _trilu(op, rng):
    for xs, upper, k in [((5, 5), False, 0), ((3, 17), True, 2), ((2, 4, 3), False, -1),
                         ((1, 1), True, 0), ((3, 17), False, 5)]:
        x = rand(rng, xs)
        out = np.zeros(xs, x.dtype)
        for idx in np.ndindex(*xs):
            i, j = idx[-2:]
            if (j - i >= k) if upper else (j - i <= k):
                out[idx] = x[idx]
        yield [x], {"upper": upper, "k": k}, out


@checks("range")
def _range(op, rng):
    for start, limit, delta, dtype in [(0, 17, 1, "i64"), (3, 10, 3, "i32"), (5, -4, -2, "i64"),
                                       (4, 4, 1, "i64"), (-1, 2, 1, "f32")]:
        vals, v = [], start
        while (v < limit) if delta > 0 else (v > limit):
            vals.append(v)
            v += delta
        yield [], {"start": (start,), "limit": (limit,), "delta": delta, "dtype": dtype}, \
            np.array(vals, NP[dtype])


@checks("dims")
def _dims(op, rng):
    # static values here; symbolic ones are bound per call (tests/test_onnx.py)
    for values, shape, dtype, expected in [
            ((7,), (), "i64", np.int64(7)), ((3, 12), (2,), "i32", np.int32([3, 12])),
            ((2, 5, 1, 4), (2, 2), "f32", np.float32([[2, 5], [1, 4]])),
            ((9,), (1,), "i64", np.int64([9]))]:
        yield [], {"values": values, "shape": shape, "dtype": dtype}, np.asarray(expected)


# --- collectives: rank r's op on a mesh of thread ranks, against loops over the ranks ---

def _on_ranks(op, inputs, attrs):
    """Every rank runs the op on its own inputs (inputs[r])."""
    return lambda groups: run_op(op, inputs[groups.rank], attrs)


def _reduced(xs, fn, dtype):
    out = np.empty(xs[0].shape, dtype)
    for idx in np.ndindex(*xs[0].shape):
        vals = [x[idx].item() for x in xs]
        out[idx] = fn(vals)
    return out


REDUCE_PY = {"sum": math.fsum, "max": max, "min": min}


@checks("all_reduce")
def _all_reduce(op, rng):
    for p, shape, dtype, red in [(1, (3, 2), "f32", "sum"), (2, (5,), "f32", "sum"),
                                 (3, (2, 3), "f64", "max"), (4, (2, 1, 3), "i32", "min"),
                                 (4, (7,), "f32", "sum")]:
        xs = [rand(rng, shape, dtype) for _ in range(p)]
        attrs = {"axis": "tp", "size": p, "op": red}
        want = _reduced(xs, REDUCE_PY[red], NP[dtype])
        yield p, _on_ranks(op, [[x] for x in xs], attrs), [[want]] * p


@checks("all_gather")
def _all_gather(op, rng):
    for p, shape, dim in [(1, (2, 3), 0), (2, (2, 3), 1), (3, (2, 3), -1), (4, (1, 2, 2), 1)]:
        xs = [rand(rng, shape) for _ in range(p)]
        d = dim % len(shape)
        full = list(shape)
        full[d] *= p
        want = np.empty(full, np.float32)
        for idx in np.ndindex(*full):   # element idx comes from rank idx[d] // shape[d]
            r, i = divmod(idx[d], shape[d])
            want[idx] = xs[r][idx[:d] + (i,) + idx[d + 1:]]
        attrs = {"axis": "tp", "size": p, "dim": dim}
        yield p, _on_ranks(op, [[x] for x in xs], attrs), [[want]] * p


@checks("reduce_scatter")
def _reduce_scatter(op, rng):
    for p, shape, dim, red in [(1, (2, 3), 0, "sum"), (2, (4, 3), 0, "sum"),
                               (3, (2, 6), -1, "max"), (4, (2, 8, 1), 1, "sum")]:
        xs = [rand(rng, shape) for _ in range(p)]
        d = dim % len(shape)
        part = list(shape)
        part[d] //= p
        wants = []
        for r in range(p):
            want = np.empty(part, np.float32)
            for idx in np.ndindex(*part):   # rank r keeps rows r*part .. of the reduction
                at = idx[:d] + (r * part[d] + idx[d],) + idx[d + 1:]
                want[idx] = REDUCE_PY[red]([x[at].item() for x in xs])
            wants.append([want])
        attrs = {"axis": "tp", "size": p, "dim": dim, "op": red}
        yield p, _on_ranks(op, [[x] for x in xs], attrs), wants


@checks("broadcast")
def _broadcast(op, rng):
    for p, root, dtype in [(1, 0, "f32"), (2, 1, "f32"), (3, 2, "i64"), (4, 0, "f16")]:
        xs = [rand(rng, (2, 3), dtype) for _ in range(p)]
        attrs = {"axis": "tp", "size": p, "root": root}
        yield p, _on_ranks(op, [[x] for x in xs], attrs), [[xs[root]]] * p


@checks("send", "recv")
def _send_recv(op, rng):
    """Rank r sends to r + peer: with the op on the sending side (the receiver takes it
    from its communicator), or the op on the receiving side (the sender hands it to its
    communicator). Each rank returns what it received (a rank with no sender: nothing)."""
    for p, peer, dtype in [(2, 1, "f32"), (3, -1, "f32"), (4, 2, "i32"), (4, -3, "f16")]:
        xs = [rand(rng, (2, 3), dtype) for _ in range(p)]
        attrs = {"axis": "tp", "size": p, "peer": peer}

        def on_rank(groups, xs=xs, attrs=attrs, peer=peer, p=p, dtype=dtype):
            comm, r = groups.group("tp"), groups.rank
            sends, source = 0 <= r + peer < p, r - peer
            if op == "send":
                out = run_op("send", [xs[r]], attrs) if sends else []
                got = comm.recv((2, 3), xs[0].dtype, source) if 0 <= source < p else None
                return out + ([got] if got is not None else [])
            if sends:
                comm.send(xs[r], r + peer)
            if not 0 <= source < p:
                return []
            return run_op("recv", [], {**attrs, "peer": -peer, "shape": (2, 3),
                                       "dtype": dtype})

        wants = []
        for r in range(p):
            sent = [xs[r]] if op == "send" and 0 <= r + peer < p else []
            wants.append(sent + ([xs[r - peer]] if 0 <= r - peer < p else []))
        yield p, on_rank, wants


# --- FLOP counts --------------------------------------------------------------------

def flops_of(op, types, attrs=None, env=None):
    g = Graph("f")
    vals = [g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    (out, *_) = g.add_node(op, vals, attrs or {})
    return OPS[op].count_flops(out.producer, env)


@pytest.mark.parametrize("a, b, batch, m, n, k", [
    ((3, 5), (5, 4), 1, 3, 4, 5),
    ((2, 3, 5), (5, 4), 2, 3, 4, 5),
    ((2, 1, 3, 5), (4, 5, 7), 8, 3, 7, 5),
    ((17, 1), (1, 17), 1, 17, 17, 1),
])
def test_matmul_flops(a, b, batch, m, n, k):
    assert flops_of("matmul", [TensorType(a), TensorType(b)]) == 2 * m * n * k * batch


def test_matmul_flops_with_symbolic_dims():
    types = [TensorType(("batch", "seq", 8)), TensorType((8, 4))]
    assert flops_of("matmul", types, env={"batch": 2, "seq": 3}) == 2 * (2 * 3) * 4 * 8


def test_conv2d_flops():
    # out [2, 6, 5, 5]; each output is a dot product over 2 channels (group 2) x 3 x 3
    x, w = TensorType((2, 4, 9, 9)), TensorType((6, 2, 3, 3))
    flops = flops_of("conv2d", [x, w], {"strides": (2, 2), "pads": (1, 1, 1, 1), "group": 2})
    assert flops == 2 * (2 * 6 * 5 * 5) * (2 * 3 * 3)


def test_elementwise_flops_count_output_elements():
    assert flops_of("add", [TensorType((3, 1)), TensorType((17,))]) == 3 * 17


# --- type-inference errors ----------------------------------------------------------

def T(*shape, dtype="f32"):
    return TensorType(shape, dtype)


@pytest.mark.parametrize("op, types, attrs, must_name", [
    ("matmul", [T(3, 4), T(5, 6)], {}, ["f32[3,4]", "f32[5,6]"]),
    ("matmul", [T("batch", 4), T(3, 2)], {}, ["f32[batch,4]", "f32[3,2]"]),
    ("add", [T(3, 4), T(5)], {}, ["f32[3,4]", "f32[5]"]),
    ("add", [T(3), T(3, dtype="i64")], {}, ["f32[3]", "i64[3]"]),
    ("reshape", [T(3, 4)], {"shape": (5, -1)}, ["f32[3,4]", "[5,-1]"]),
    ("reshape", [T(3, 4)], {"shape": (5, 2)}, ["f32[3,4]", "[5,2]"]),
    ("reshape", [T("batch", 4)], {"shape": ("seq", -1)}, ["f32[batch,4]", "[seq,-1]"]),
    ("transpose", [T(2, 3)], {"perm": (0, 0)}, ["f32[2,3]", "[0, 0]"]),
    ("gather", [T(5, 3), T(2)], {}, ["f32[5,3]", "f32[2]"]),
    ("tensor_scatter", [T(2, 8, 3), T(2, 2, 4), T(2, dtype="i64")], {"axis": 1},
     ["f32[2,8,3]", "f32[2,2,4]"]),
    ("tensor_scatter", [T(2, 8, 3), T(2, 2, 3), T(3, dtype="i64")], {"axis": 1},
     ["i64[3]", "one per batch row"]),
    ("tensor_scatter", [T(2, 8, 3), T(2, 9, 3), T(2, dtype="i64")], {"axis": 1},
     ["more rows"]),
    ("concat", [T(2, 3), T(2, 4)], {"axis": 0}, ["f32[2,3]", "f32[2,4]"]),
    ("reshape", [T(3)], {"shape": (3,), "foo": 1}, ["unknown attribute", "foo"]),
    ("reshape", [T(3)], {}, ["missing required attribute", "shape"]),
    ("reshape", [T(3)], {"shape": "3"}, ["shape", "'3'"]),
    ("add", [T(3), T(3), T(3)], {}, ["takes 2 inputs, got 3"]),
    ("softmax", [T(3, 4, dtype="i64")], {}, ["i64[3,4]"]),
])
def test_type_inference_errors(op, types, attrs, must_name):
    g = Graph("bad")
    vals = [g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    with pytest.raises(ShapeError) as info:
        g.add_node(op, vals, attrs, loc="model.py:12")
    msg = str(info.value)
    assert isinstance(info.value, TensorcError)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{op} "), msg
    assert "model.py:12" in msg, msg
    for part in must_name:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert not g.nodes, "a node that fails inference must not be added"


# --- composite ops ------------------------------------------------------------------

def attention_loops(q, k, v, mask=None, scale=1.0, causal=False, mask_value=-math.inf):
    b, h, t, d = q.shape
    s, dv = k.shape[2], v.shape[3]
    if k.shape[1] not in (1, h):  # grouped query heads: query head i reads kv head i // g
        k, v = (np.repeat(x, h // k.shape[1], axis=1) for x in (k, v))
    K, V = np.broadcast_to(k, (b, h, s, d)), np.broadcast_to(v, (b, h, s, dv))
    M = None if mask is None else np.broadcast_to(mask, (b, h, t, s))
    out = np.empty((b, h, t, dv))
    for bi, hi, i in np.ndindex(b, h, t):
        scores = []
        for j in range(s):
            sc = scale * math.fsum(float(q[bi, hi, i, p]) * float(K[bi, hi, j, p])
                                   for p in range(d))
            if causal and j > i:
                sc = mask_value
            if M is not None:
                keep = M[bi, hi, i, j]
                sc = (sc if keep else mask_value) if M.dtype == np.bool_ else sc + float(keep)
            scores.append(sc)
        weights = _softmax_row(scores)
        for c in range(dv):
            out[bi, hi, i, c] = math.fsum(w * float(V[bi, hi, j, c])
                                          for j, w in enumerate(weights))
    return out.astype(q.dtype)


@checks("attention")
def _attention(op, rng):
    def qkv(b, h, t, s, d, dv, hk=None):
        hk = h if hk is None else hk
        return (rand(rng, (b, h, t, d), "f32", -1, 1), rand(rng, (b, hk, s, d), "f32", -1, 1),
                rand(rng, (b, hk, s, dv), "f32", -1, 1))
    q, k, v = qkv(2, 3, 5, 5, 4, 4)
    yield [q, k, v], {"scale": 0.5}, attention_loops(q, k, v, scale=0.5)
    yield [q, k, v], {"causal": True}, attention_loops(q, k, v, causal=True)
    q, k, v = qkv(1, 2, 3, 17, 4, 3, hk=1)  # one shared key/value head; t != s
    yield [q, k, v], {"causal": True}, attention_loops(q, k, v, causal=True)
    q, k, v = qkv(2, 1, 4, 40, 3, 2)  # more keys than one block of the reference
    keep = rand(rng, (2, 1, 1, 40), "bool")
    keep[..., 0] = True
    yield [q, k, v, keep], {}, attention_loops(q, k, v, keep)
    bias = rand(rng, (1, 1, 4, 40), "f32", -2, 2)
    yield [q, k, v, bias], {"scale": 0.25}, attention_loops(q, k, v, bias, scale=0.25)
    none = np.zeros((1, 1, 1, 40), bool)  # every key masked: finite fill -> uniform weights
    yield [q, k, v, none], {"mask_value": -1e9}, attention_loops(q, k, v, none,
                                                                 mask_value=-1e9)
    q, k, v = qkv(2, 6, 4, 35, 3, 2, hk=2)  # grouped query heads: 3 share a kv head
    yield [q, k, v], {"causal": True}, attention_loops(q, k, v, causal=True)
    keep = rand(rng, (2, 6, 4, 35), "bool")  # a per-head mask
    keep[..., 0] = True
    yield [q, k, v, keep], {"scale": 0.5}, attention_loops(q, k, v, keep, scale=0.5)
    bias = rand(rng, (4, 35), "f32", -2, 2)
    yield [q, k[:1], v[:1], bias], {}, attention_loops(q, k[:1], v[:1], bias)


@checks("local_attention", "block_sparse_attention")
def _sparse_attention(op, rng):
    """The loop formula with every pair the pattern's definition (written pair by pair
    in test_sparse_attention) leaves out masked with -inf."""
    from test_sparse_attention import block_visible, brute, local_visible
    cases = {"local_attention": [({"before": 2, "after": 1}, (2, 2, 9, 9)),
                                 ({"before": 3, "causal": True, "dilation": 2,
                                   "global_tokens": (0,)}, (1, 2, 11, 11)),
                                 ({"before": 1, "after": 1, "global_tokens": (4,)}, (2, 1, 6, 6))],
             "block_sparse_attention": [({"block": 3}, (2, 2, 10, 10)),
                                        ({"block": 4, "local_blocks": 0, "random_blocks": 1,
                                          "seed": 2, "causal": True}, (1, 2, 13, 13)),
                                        ({"block": 2, "local_blocks": 0,
                                          "global_tokens": (1, 2)}, (1, 1, 7, 7))]}
    for attrs, (b, h, t, s) in cases[op]:
        a = OPS[op].complete_attrs(attrs)
        if op == "local_attention":
            vis = brute(local_visible, t, s, a["before"], a["after"], a["dilation"],
                        a["causal"], a["global_tokens"])
        else:
            vis = brute(block_visible, t, s, t, s, a["block"], a["local_blocks"],
                        a["random_blocks"], a["seed"], a["causal"], a["global_tokens"])
        q, k, v = (rand(rng, (b, h, n, 3), "f32", -1, 1) for n in (t, s, s))
        keep = rand(rng, (b, 1, 1, s), "bool")
        keep[..., 0] = True
        yield [q, k, v], attrs, attention_loops(q, k, v, vis)
        yield [q, k, v, keep], attrs, attention_loops(q, k, v, keep & vis)


@checks("linear_attention")
def _linear_attention(op, rng):
    from test_sparse_attention import favor_naive
    w = rand(rng, (5, 3), "f32", -1, 1)
    for causal, (b, h, hk, t, s) in ((False, (2, 2, 2, 4, 6)), (True, (1, 2, 1, 5, 5))):
        q, k, v = (rand(rng, shape, "f32", -1, 1)
                   for shape in ((b, h, t, 3), (b, hk, s, 3), (b, hk, s, 2)))
        bias = rand(rng, (b, 1, 1, s), "f32", -2, 2)
        attrs = {"scale": 0.5, "causal": causal}
        yield [q, k, v, w], attrs, favor_naive(q, k, v, w, None, 0.5, causal).astype(np.float32)
        yield [q, k, v, w, bias], attrs, favor_naive(q, k, v, w, bias, 0.5,
                                                     causal).astype(np.float32)


# --- gradient ops: checked against central differences of the forward's loop formula ---

def numeric_vjp(forward, inputs, dy, wrt, eps=1e-6):
    """d sum(forward(*inputs) * dy) / d inputs[i] for i in wrt, in float64."""
    xs = [np.asarray(a, np.float64) if a.dtype.kind == "f" else a for a in inputs]
    dy = np.asarray(dy, np.float64)
    out = []
    for i in wrt:
        d = np.zeros(xs[i].shape)
        for j in np.ndindex(*xs[i].shape):
            up, dn = [list(xs), list(xs)]
            up[i], dn[i] = xs[i].copy(), xs[i].copy()
            up[i][j] += eps
            dn[i][j] -= eps
            d[j] = np.sum((forward(*up) - forward(*dn)) * dy) / (2 * eps)
        out.append(d.astype(inputs[i].dtype))
    return out


@checks("attention_grad")
def _attention_grad(op, rng):
    for (qs, ks, vs), mask, attrs in [
            (((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 3)), None, {"scale": 0.5}),
            (((2, 4, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)), None, {"causal": True}),
            (((1, 2, 3, 4), (1, 1, 4, 4), (1, 1, 4, 2)), (1, 1, 3, 4), {})]:
        q, k, v = (rand(rng, s, "f32", -1, 1) for s in (qs, ks, vs))
        extra = [rand(rng, mask, "bool")] if mask else []
        if extra:
            extra[0][..., 0] = True
        dy = rand(rng, qs[:3] + vs[3:], "f32", -1, 1)

        def fwd(q, k, v, extra=extra, attrs=attrs):
            return attention_loops(q, k, v, *extra, **attrs)
        yield [q, k, v, *extra, dy], attrs, numeric_vjp(fwd, [q, k, v], dy, (0, 1, 2))


@checks("conv2d_grad")
def _conv2d_grad(op, rng):
    for xs, ws, attrs in [((1, 2, 5, 5), (3, 2, 3, 3), {}),
                          ((2, 3, 7, 6), (4, 3, 3, 2), {"strides": (2, 1), "pads": (1, 0, 2, 1)}),
                          ((1, 4, 5, 5), (2, 2, 2, 2), {"group": 2, "dilations": (2, 1)})]:
        x, w = rand(rng, xs), rand(rng, ws)
        dy = rand(rng, conv2d_im2col(x, w, **attrs).shape)
        yield [x, w, dy], attrs, numeric_vjp(lambda x, w, a=attrs: conv2d_im2col(x, w, **a),
                                             [x, w], dy, (0, 1))


@checks("dropout")
def _dropout(op, rng):
    """The mask hash element by element in Python integers (the op works on arrays)."""
    big_p, big_q = 2147483647, 2147483629
    for shape, seed, p, salt in [((4, 5), 3, 0.5, 0), ((17,), -9, 0.1, 3),
                                 ((2, 3, 4), 2**40, 0.9, 1)]:
        x = rand(rng, shape)
        s = seed % big_p                       # Python's % is never negative here
        m = s * 48271 % (big_p - 1) + 1
        out = np.zeros(shape, np.float32)
        for i, j in enumerate(np.ndindex(*shape)):
            x0 = (i + salt * 7919 + 1) % big_p * m % big_p
            x1 = (x0 * x0 + 12345) % big_q
            if (x1 * x1 + x0) % big_p >= int(p * big_p):
                out[j] = x[j] * np.float32(1.0 / (1.0 - p))
        yield [x, np.array(seed, np.int64)], {"p": p, "salt": salt}, out


@checks("scatter_add")
def _scatter_add(op, rng):
    for ds, axis, idx in [((5, 3), 0, np.array([4, 0, -1, 4], np.int64)),
                          ((3, 6), 1, np.array([[5, 0], [5, 5]], np.int32)),
                          ((2, 3, 4), -1, np.array(2, np.int64))]:
        data = rand(rng, ds)
        ax = axis % data.ndim
        upd = rand(rng, ds[:ax] + idx.shape + ds[ax + 1:])
        out = data.astype(np.float64)
        for o in np.ndindex(*upd.shape):   # element by element: repeated indices add up
            pick = int(idx[o[ax:ax + idx.ndim]]) % ds[ax]
            out[o[:ax] + (pick,) + o[ax + idx.ndim:]] += upd[o]
        yield [data, idx, upd], {"axis": axis}, out.astype(np.float32)


def _fused_body(inputs, build):
    body = Graph("region")
    vals = [body.add_input(f"in{i}", TensorType.of(a)) for i, a in enumerate(inputs)]
    body.outputs = build(body, *vals)
    return body.verify()


@checks("fused")
def _fused(op, rng):
    x, w, b = rand(rng, (3, 5)), rand(rng, (5, 4)), rand(rng, (4,))
    body = _fused_body([x, w, b], lambda g, x, w, b: [
        g.add("gelu", g.add("add", g.add("matmul", x, w), b))])
    yield [x, w, b], {"body": body}, map_elements(lambda h, c: _gelu_exact(h + c),
                                                  matmul_loops(x, w), b, dtype="f32")
    x = rand(rng, (17,))
    body = _fused_body([x], lambda g, x: [
        g.add("exp", g.add("mul", x, g.add_constant("two", np.float32(2.0))))])
    yield [x], {"body": body}, map_elements(lambda v: math.exp(2 * v), x, dtype="f32")
    x, y = rand(rng, (3, 1)), rand(rng, (1, 17))
    body = _fused_body([x, y], lambda g, x, y: [g.add("add", x, y), g.add("mul", x, y)])
    yield [x, y], {"body": body}, [map_elements(operator.add, x, y, dtype="f32"),
                                   map_elements(operator.mul, x, y, dtype="f32")]
    x = rand(rng, (2, 17))
    body = _fused_body([x], lambda g, x: [g.add("softmax", g.add("neg", x))])
    yield [x], {"body": body}, map_rows(-x, -1, _softmax_row, "f32")


QRANGE = {"u8": (0, 255), "i8": (-128, 127)}


def _q(v, s, z, dtype):
    """One element quantized: the f32 quotient, rounded half to even, shifted, saturated."""
    lo, hi = QRANGE[dtype]
    return min(max(round(float(np.float32(v) / np.float32(s))) + z, lo), hi)


def _qparams_cases(rng):
    """(x, scale, zero point) triples: per tensor, per column, per row; u8 and i8."""
    for shape, pshape in [((3, 17), ()), ((4, 5), (1, 5)), ((2, 3, 7), (2, 3, 1))]:
        for dtype in ("u8", "i8"):
            x = rand(rng, shape, "f32", -4.0, 4.0)
            x.flat[0] = 1e4   # saturates
            s = rng.uniform(0.01, 0.1, pshape).astype(np.float32)
            z = rand(rng, pshape, dtype, *((100, 150) if dtype == "u8" else (-20, 20)))
            yield x, s, z, dtype


@checks("quantize")
def _quantize(op, rng):
    for x, s, z, dtype in _qparams_cases(rng):
        yield [x, s, z], {}, map_elements(lambda v, s, z, d=dtype: _q(v, s, z, d), x, s, z,
                                          dtype=dtype)


@checks("dequantize")
def _dequantize(op, rng):
    for x, s, z, dtype in _qparams_cases(rng):
        q = rand(rng, x.shape, dtype, *QRANGE[dtype])
        yield [q, s, z], {}, map_elements(lambda q, s, z: (q - z) * s, q, s, z, dtype="f32")
    acc = rand(rng, (3, 4), "i32", -5000, 5000)
    yield [acc, np.float32(0.01), np.int32(0)], {}, \
        map_elements(lambda q, s, z: q * s, acc, np.float32(0.01), np.int32(0), dtype="f32")


@checks("fake_quantize")
def _fake_quantize(op, rng):
    for x, s, z, dtype in _qparams_cases(rng):
        yield [x, s, z], {}, map_elements(
            lambda v, s, z, d=dtype: (_q(v, s, z, d) - z) * s, x, s, z, dtype="f32")


@checks("quant_params")
def _quant_params(op, rng):
    for shape, axes in [((3, 17), None), ((4, 9), (-1,)), ((2, 3, 5), (0, 2)), ((6,), (0,))]:
        x = rand(rng, shape, "f32")
        for dtype in ("u8", "i8"):
            pshape = tuple(1 if axes is None or i in {a % len(shape) for a in axes} else d
                           for i, d in enumerate(shape))
            scale, zp = np.empty(pshape, np.float32), np.empty(pshape, NP[dtype])
            for _, pos in rows(x, range(len(shape)) if axes is None else axes):
                vals = [float(x[p]) for p in pos]
                idx = tuple(0 if i in {a % len(shape) for a in axes or range(len(shape))}
                            else p for i, p in enumerate(pos[0]))
                if dtype == "u8":
                    lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                    s = np.float32(np.float32(hi - lo) / np.float32(255))
                    scale[idx], zp[idx] = s, min(max(round(float(np.float32(-lo) / s)), 0), 255)
                else:
                    scale[idx] = np.float32(np.float32(max(abs(v) for v in vals)) / np.float32(127))
                    zp[idx] = 0
            yield [x], {"dtype": dtype, "axes": axes}, [scale, zp]
    zero = np.zeros((2, 3), np.float32)   # a zero range: scale 1, every value exact
    yield [zero], {"axes": (1,)}, [np.ones((2, 1), np.float32), np.zeros((2, 1), np.uint8)]


@checks("matmul_integer")
def _matmul_integer(op, rng):
    for sa, sb, da, db in [((3, 17), (17, 5), "u8", "i8"), ((2, 3, 9), (9, 4), "i8", "i8"),
                           ((4, 6), (6, 3), "u8", "u8"), ((6,), (6, 2), "u8", "i8")]:
        a, b = rand(rng, sa, da, *QRANGE[da]), rand(rng, sb, db, *QRANGE[db])
        a.flat[:3], b.flat[:3] = QRANGE[da][1], QRANGE[db][0]   # extremes: no saturation
        yield [a, b], {}, matmul_loops(a.astype(np.int64), b.astype(np.int64)).astype(np.int32)
        za = rand(rng, sa[:-1] + (1,) if len(sa) > 1 else (), da, *QRANGE[da])
        zb = rand(rng, (sb[-1],), db, *QRANGE[db])
        want = matmul_loops(a.astype(np.int64) - za.astype(np.int64),
                            b.astype(np.int64) - zb.astype(np.int64))
        yield [a, b, za, zb], {}, want.astype(np.int32)


def test_unknown_attribute_kind_is_refused_at_declaration():
    from tensorc.ops.registry import Attr
    with pytest.raises(ValueError, match="unknown attribute kind 'intz'"):
        Attr("intz")
    assert Attr("ints", ()).kind == "ints"


@pytest.mark.parametrize("dtype", ["f32", "f64", "i32", "i64"])
@pytest.mark.parametrize("op,want", [("reduce_max", "lowest"), ("reduce_min", "highest")])
def test_empty_set_reductions_give_onnx_answer_on_every_backend(op, want, dtype):
    """ONNX: max over nothing is -inf (an integer type's minimum), min is +inf (maximum);
    numpy's own max raises there."""
    from tensorc.backends import available_backends, get_backend
    from tensorc.ir import DTYPES, Graph, TensorType
    np_dtype = DTYPES[dtype]
    lim = (np.inf if want == "highest" else -np.inf) if np_dtype.kind == "f" else \
        (np.iinfo(np_dtype).max if want == "highest" else np.iinfo(np_dtype).min)
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 0, 3), dtype))
    g.outputs = list(g.add_node(op, [x], {"axes": (1,)}))
    for name in [b for b in ("numpy", "llvm") if b in available_backends()]:
        got = get_backend(name).compile(g)(np.zeros((2, 0, 3), np_dtype))
        assert got.dtype == np_dtype and got.shape == (2, 3)
        assert (got == lim).all(), (name, got)
