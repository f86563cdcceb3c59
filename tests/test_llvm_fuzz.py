"""Differential fuzzing of the LLVM backend: hypothesis builds small random graphs that mix
elementwise ops with broadcasting, where/comparisons, integer casts and arithmetic, views
(reshape, transpose, slice, expand, squeeze), reductions, softmax and layer_norm, matmuls
followed by what the GEMM epilogue folds (bias, activation, residual, also across a
reshape), attention patterns, gather with 0-d/1-d/2-d indices, concat and split, in f32 or
f64. Each graph runs through O0 or O2, on 1 or 3 threads (every kernel split), sometimes
with a NaN in an input, and must match the numpy reference within 1e-4 relative to the
output's largest magnitude (see FLOOR). A bad feed (an out-of-range gather index, a wrong
shape) must raise the same error type on both backends.

The examples are the same on every run; TENSORC_FUZZ_EXAMPLES=N runs N fresh random ones
(a failure prints the @reproduce_failure line that replays it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tensorc
import tensorc.passes
from tensorc.backends import get_backend
from tensorc.backends.llvm import runtime
from tensorc.errors import TensorcError
from tensorc.ir import DTYPES, Graph, TensorType

DIMS = (1, 2, 3, 5, 8, 17)
BIG = 2048
TOL = 1e-4
# Errors are measured against the output's largest magnitude, or FLOOR if that is smaller:
# an output that cancels to ~0 (sum of a layer_norm) keeps only float32 rounding noise of
# its O(1) inputs, in numpy's reference as much as here.
FLOOR = 0.1
_N = os.environ.get("TENSORC_FUZZ_EXAMPLES")
SETTINGS = settings(max_examples=int(_N or 60), deadline=None, derandomize=not _N,
                    print_blob=True, suppress_health_check=[
                        HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


class Builder:
    """Grows one random graph; `pool` holds the float values built so far."""

    def __init__(self, data):
        self.draw = data.draw
        self.g = Graph("fuzz")
        self.feeds: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(self.draw(st.integers(0, 2**16), "seed"))
        self.dtype = self.draw(st.sampled_from(("f32", "f32", "f64")), "dtype")
        self.pool = [self.input(self.shape(1, 4))]
        self.extra = []
        self.index_inputs: list[tuple[str, int]] = []   # (gather index input, axis size)

    # -- helpers --
    def shape(self, lo=0, hi=4):
        return tuple(self.draw(st.lists(st.sampled_from(DIMS), min_size=lo, max_size=hi)))

    def input(self, shape):
        v = self.g.add_input(f"in{len(self.feeds)}", TensorType(tuple(shape), self.dtype))
        self.feeds[v.name] = self.rng.uniform(-2, 2, shape).astype(DTYPES[self.dtype])
        return v

    def const(self, shape, value=None):
        data = self.rng.uniform(-2, 2, shape) if value is None else np.full(shape, value)
        return self.g.add_constant(f"c{len(self.g.constants)}",
                                   data.astype(DTYPES[self.dtype]))

    def pick(self):
        """Often the newest value, so that ops chain."""
        return self.draw(st.just(self.pool[-1]) | st.sampled_from(self.pool))

    def axis(self, v):
        return self.draw(st.integers(-v.type.rank, v.type.rank - 1))

    def partner(self, shape):
        """An input or a constant that broadcasts against `shape` (maybe bigger)."""
        rank = self.draw(st.integers(0, len(shape)))
        dims = [self.draw(st.sampled_from((d, 1))) for d in shape[len(shape) - rank:]]
        if rank == len(shape) and self.draw(st.booleans()):
            dims = [self.draw(st.sampled_from((2, 3)))] + dims
        return self.input(dims) if self.draw(st.booleans()) else self.const(dims)

    # -- steps: each adds values to the pool --
    def unary(self):
        v = self.pick()
        op = self.draw(st.sampled_from(("neg", "abs", "tanh", "sigmoid", "relu", "gelu",
                                        "erf", "sin", "exp")))
        if op == "exp":
            return self.g.add("exp", self.g.add("tanh", v))
        if op == "gelu":
            return self.g.add("gelu", v, approximate=self.draw(st.sampled_from(("none",
                                                                                "tanh"))))
        return self.g.add(op, v)

    def binary(self):
        v = self.pick()
        other = self.partner(v.type.shape)
        op = self.draw(st.sampled_from(("add", "sub", "mul", "maximum", "minimum", "div")))
        a, b = (v, other) if self.draw(st.booleans()) else (other, v)
        if op == "div":  # a divisor away from zero
            b = self.g.add("add", self.g.add("abs", b), self.const((), 1.0))
        return self.g.add(op, a, b)

    def select(self):
        """where(v < partner, v, partner): a comparison and a bool operand. Continuous
        where v == partner, so float32 rounding cannot flip the result by a jump."""
        v = self.pick()
        other = self.partner(v.type.shape)
        return self.g.add("where", self.g.add("less", v, other), v, other)

    def integer(self):
        """v + float(int(4 x) op k) for a fresh input x: float -> int casts (truncating) and
        integer add/sub/mul/div/max. 4 x is exact, so no rounding can move a truncation."""
        v = self.pick()
        dtype = self.draw(st.sampled_from(("i32", "i64")))
        n = self.g.add("cast", self.g.add("mul", self.input(v.type.shape), self.const((), 4.0)),
                       dtype=dtype)
        k = self.g.add_constant(f"c{len(self.g.constants)}", self.rng.integers(
            -3, 4, self.draw(st.sampled_from([(), v.type.shape[-1:]]))).astype(DTYPES[dtype]))
        op = self.draw(st.sampled_from(("add", "mul", "div", "maximum", "sub")))
        return self.g.add("add", v, self.g.add("cast", self.g.add(op, n, k), dtype=self.dtype))

    def view(self):
        v = self.pick()
        shape, rank = v.type.shape, v.type.rank
        kind = self.draw(st.sampled_from(("reshape", "transpose", "slice", "expand",
                                          "squeeze")))
        if kind == "reshape" or rank == 0:
            return self.g.add("reshape", v, shape=self.regroup(shape))
        if kind == "transpose":
            perm = self.draw(st.permutations(range(rank)))
            return self.g.add("transpose", v, perm=tuple(perm))
        if kind == "slice":  # may come out empty (then it is only an output)
            a = self.axis(v)
            n = shape[a]
            start = self.draw(st.integers(-n, n - 1))
            end = self.draw(st.integers(-n - 1, n + 1))
            step = self.draw(st.sampled_from((1, 1, 2, -1)))
            return self.g.add("slice", v, starts=(start,), ends=(end,), axes=(a,),
                              steps=(step,))
        if kind == "expand":
            at = self.draw(st.integers(0, rank))
            u = self.g.add("unsqueeze", v, axes=(at,))
            big = list(u.type.shape)
            big[at] = self.draw(st.sampled_from((2, 3)))
            return self.g.add("expand", u, shape=tuple(big))
        ones = tuple(i for i, d in enumerate(shape) if d == 1)
        if not ones:
            return self.g.add("unsqueeze", v, axes=(self.draw(st.integers(0, rank)),))
        return self.g.add("squeeze", v, axes=(self.draw(st.sampled_from(ones)),))

    def regroup(self, shape):
        """A random shape with the same element count."""
        factors = [p for d in shape for p in _primes(d)]
        factors = list(self.draw(st.permutations(factors))) if factors else []
        out, i = [], 0
        while i < len(factors):
            k = self.draw(st.integers(1, len(factors) - i))
            out.append(int(np.prod(factors[i:i + k])))
            i += k
        for _ in range(self.draw(st.integers(0, 1))):
            out.insert(self.draw(st.integers(0, len(out))), 1)
        return tuple(out)

    def reduce(self):
        v = self.pick()
        if v.type.rank == 0:
            return self.g.add("neg", v)
        op = self.draw(st.sampled_from(("reduce_sum", "reduce_mean", "reduce_max",
                                        "reduce_min", "softmax", "log_softmax",
                                        "layer_norm")))
        if op in ("softmax", "log_softmax"):
            return self.g.add(op, v, axis=self.axis(v))
        if op == "layer_norm":
            a = self.axis(v)
            norm = v.type.shape[a % v.type.rank:]
            params = [self.const(norm) if self.draw(st.booleans()) else self.input(norm)
                      for _ in range(self.draw(st.integers(0, 2)))]
            return self.g.add("layer_norm", v, *params, axis=a, eps=1e-3)
        axes = self.draw(st.none() | st.lists(st.integers(0, v.type.rank - 1), min_size=1,
                                              unique=True))
        return self.g.add(op, v, axes=None if axes is None else tuple(axes),
                          keepdims=self.draw(st.booleans()))

    def matmul(self):
        """x @ W, maybe flattened to 2-D and back (GPT-2's Conv1D), then the chain the
        GEMM epilogue folds: + bias, gelu/relu, + residual."""
        v = self.pick()
        if v.type.rank == 0:
            v = self.g.add("reshape", v, shape=(1, 1))
        shape, k = v.type.shape, v.type.shape[-1]
        n = self.draw(st.sampled_from(DIMS))
        w = self.const((k, n)) if self.draw(st.booleans()) else self.input((k, n))
        flat = v.type.rank > 2 and self.draw(st.booleans())
        x = self.g.add("reshape", v, shape=(-1, k)) if flat else v
        y = self.g.add("matmul", x, w)
        if flat:
            y = self.g.add("reshape", y, shape=shape[:-1] + (n,))
        if self.draw(st.booleans()):
            y = self.g.add("add", y, self.const((n,)))
        act = self.draw(st.sampled_from((None, "gelu", "relu")))
        if act:
            y = self.g.add(act, y)
        if self.draw(st.booleans()):
            same = [u for u in self.pool if u.type.shape == y.type.shape]
            res = self.draw(st.sampled_from(same)) if same and self.draw(st.booleans()) \
                else self.input(y.type.shape)
            y = self.g.add("add", res, y) if self.draw(st.booleans()) else \
                self.g.add("add", y, res)
        return y

    def batched_matmul(self):
        v = self.pick()
        if v.type.rank < 2:
            return self.g.add("sin", v)
        m, k = v.type.shape[-2:]
        other = self.input(v.type.shape[:-2] + (self.draw(st.sampled_from(DIMS)), k))
        return self.g.add("matmul", v, self.g.add("transpose", other, perm=tuple(
            range(other.type.rank - 2)) + (other.type.rank - 1, other.type.rank - 2)))

    def attention(self):
        """softmax(q @ k^T * scale [+ causal -inf mask]) @ v: O2 makes it an attention op."""
        q = self.pick()
        rank = self.draw(st.sampled_from((2, 4)))   # O2 fuses the 4-D form
        while q.type.rank < rank:
            q = self.g.add("unsqueeze", q, axes=(0,))
        *batch, s, d = q.type.shape
        k = self.input((*batch, self.draw(st.sampled_from(DIMS)), d))
        v = self.input(k.type.shape[:-1] + (self.draw(st.sampled_from(DIMS)),))
        rank = q.type.rank
        kt = self.g.add("transpose", k, perm=tuple(range(rank - 2)) + (rank - 1, rank - 2))
        scores = self.g.add("mul", self.g.add("matmul", q, kt), self.const((), 0.3))
        if self.draw(st.booleans()):
            keep = self.g.add("trilu", self.g.add("full", shape=scores.type.shape[-2:],
                                                  value=True, dtype="bool"))
            scores = self.g.add("where", keep, scores, self.const((), -np.inf))
        return self.g.add("matmul", self.g.add("softmax", scores, axis=-1), v)

    def gather(self):
        v = self.pick()
        if v.type.rank == 0:
            return self.g.add("abs", v)
        a = self.axis(v)
        n = v.type.shape[a]
        ishape = self.shape(0, 2)
        if self.draw(st.booleans()):
            idx = self.g.add_constant(f"c{len(self.g.constants)}",
                                      self.rng.integers(-n, n, ishape).astype(np.int64))
        else:
            idx = self.g.add_input(f"in{len(self.feeds)}", TensorType(ishape, "i64"))
            self.feeds[idx.name] = self.rng.integers(-n, n, ishape).astype(np.int64)
            self.index_inputs.append((idx.name, n))
        return self.g.add("gather", v, idx, axis=a)

    def concat_split(self):
        v = self.pick()
        if v.type.rank == 0:
            return self.g.add("tanh", v)
        a = self.axis(v)
        if self.draw(st.booleans()):
            shape = list(v.type.shape)
            shape[a] = self.draw(st.sampled_from(DIMS))
            other = self.input(shape) if self.draw(st.booleans()) else self.const(shape)
            return self.g.add("concat", *self.draw(st.permutations([v, other])), axis=a)
        n = v.type.shape[a]
        cut = self.draw(st.integers(0, n))
        parts = self.g.add_node("split", [v], {"axis": a, "sizes": (cut, n - cut)})
        self.keep(parts[0])
        return parts[1]

    STEPS = ("unary", "binary", "select", "integer", "view", "reduce", "matmul", "batched_matmul",
             "attention", "gather", "concat_split")

    def keep(self, v):
        """Pool a new value; an empty or big one may only be an output (so that no graph
        grows past a few times BIG elements)."""
        n = np.prod(v.type.shape, dtype=int)
        (self.pool if 0 < n <= BIG else self.extra).append(v)

    def build(self) -> Graph:
        for _ in range(self.draw(st.integers(1, 9))):
            self.keep(getattr(self, self.draw(st.sampled_from(self.STEPS)))())
        outs = [self.pool[-1]] + self.draw(st.lists(st.sampled_from(self.pool[:-1] +
                                                                    self.extra),
                                                    max_size=2, unique=True))
        self.g.outputs = list(dict.fromkeys(outs))
        self.g.verify()
        return self.g


def _primes(d: int) -> list[int]:
    out, p = [], 2
    while d > 1:
        while d % p == 0:
            out.append(p)
            d //= p
        p += 1
    return out


def _rel_err(got, want) -> float:
    """max |got - want| over max |want|, with |want| at least FLOOR (NaN matches NaN)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not want.size:
        return 0.0
    same = np.isnan(got) & np.isnan(want) | (got == want)
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf
        diff = np.where(same, 0.0, np.abs(got - want))
    scale = np.abs(np.where(np.isfinite(want), want, 0)).max()
    return float(diff.max() / max(scale, FLOOR))


@SETTINGS
@given(data=st.data(), pipeline=st.sampled_from(["O0", "O2"]), threads=st.sampled_from([1, 3]))
def test_random_graphs_match_numpy(data, pipeline, threads, monkeypatch):
    monkeypatch.setattr(runtime, "MIN_WORK_PER_THREAD", 1)  # split even tiny kernels
    b = Builder(data)
    g = b.build()
    if data.draw(st.integers(0, 3)) == 0:  # a NaN must go where numpy's goes
        name = data.draw(st.sampled_from([k for k, a in b.feeds.items() if a.dtype.kind == "f"]))
        b.feeds[name].reshape(-1)[data.draw(st.integers(0, b.feeds[name].size - 1))] = np.nan
    with np.errstate(all="ignore"):
        want = tensorc.compile(g, "numpy").run(b.feeds)
    exe = get_backend("llvm").compile(tensorc.passes.run_pipeline(g, pipeline), threads=threads)
    got = exe.run(b.feeds)
    for step in exe.program().steps:   # what was exercised: --hypothesis-show-statistics
        if getattr(step, "op", None) == "matmul":
            event(f"matmul epilogue {sorted(step.epilogue)}")
        elif getattr(step, "op", None) is not None:
            event(f"{'fallback' if step.fallback else 'library'} {step.op}")
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape and got[name].dtype == w.dtype, name
        assert _rel_err(got[name], w) <= TOL, (name, _rel_err(got[name], w))


def _error_type(exe, feeds):
    try:
        exe.run(feeds)
    except TensorcError as e:
        return type(e)
    return None


@settings(SETTINGS, max_examples=max(SETTINGS.max_examples // 2, 1))
@given(data=st.data())
def test_bad_feeds_raise_the_same_error(data):
    b = Builder(data)
    b.keep(b.gather())
    g = b.build()
    feeds = dict(b.feeds)
    bad_index = [(k, n) for k, n in b.index_inputs if feeds[k].size]
    if bad_index and data.draw(st.booleans()):
        name, n = data.draw(st.sampled_from(bad_index))
        flat = feeds[name].copy().reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from((n, -n - 1)))
        feeds[name] = flat.reshape(feeds[name].shape)
    else:  # one input with an extra axis
        name = data.draw(st.sampled_from(sorted(feeds)))
        feeds[name] = np.zeros(feeds[name].shape + (2,), feeds[name].dtype)
    want = _error_type(tensorc.compile(g, "numpy"), feeds)
    got = _error_type(get_backend("llvm").compile(g), feeds)
    assert want is not None and got is want, (want, got)
