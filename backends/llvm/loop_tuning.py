"""The schedule space of the generated kernels' innermost loops: LLVM's vector width and
interleave (unroll) count, per class of kernel, tunable per host (`tuning.py`).

The generated kernels are scalar loop nests that LLVM's loop vectoriser widens at O3
(`codegen.py`, `jit.py`). Its choice is the default, `{"width": 0, "interleave": 0}`,
which adds nothing to the IR: a kernel on the default schedule is exactly today's
module. A candidate sets both through loop metadata on each innermost loop
(`llvm.loop.vectorize.width`, `llvm.loop.interleave.count`), so the schedule is part
of the IR text and so of the JIT cache key.

Two spaces, asked for each kernel the runtime compiles (`kernel_schedule`, which
`runtime.compile_kernels` hands `codegen.render`; `kernel_key` says which space):
- "elementwise": kernels that only store (elementwise, copies, gathers). Every
  element is computed alone, so every schedule gives bitwise the same numbers.
- "reduction": kernels with a loop-carried accumulator (layer_norm, softmax, sums).
  Float accumulators may be reassociated (kernel IR's rule), so the width times the
  interleave count is the number of partial sums, and the summation order, hence the
  last bits, changes with the schedule: `tests/test_loop_tuning.py` measures it
  against the documented tolerance (float32: `REDUCTION_RTOL`).

A key is a class of kernels that shares a best schedule, not one kernel:
(dtype, inner extent class, inputs, maths) for elementwise kernels, (op, dtype, inner
extent class, inputs) for reductions, where inputs counts the input buffers of the
result's dtype (the streams a loop reads) and maths names the costly unary ops the
loop computes ("tanh", "exp+log", or ""), which make a loop compute bound. The extent
class is the inner loop's extent rounded up to a power of two (8 to 65536); `measure`
times a representative kernel of the class built from the key on random inputs.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time

import numpy as np

from tensorc.types import DTYPES

from .. import kernel_ir as K
from . import codegen, jit, tuning

DEFAULT = {"width": 0, "interleave": 0}   # LLVM's own choice: no metadata
WIDTHS = (4, 8, 16)
INTERLEAVES = (1, 2, 4)
TUNED_DTYPES = ("f16", "f32", "f64", "i8", "u8", "i32", "i64")   # others: the default
# Reductions whose representative is the op itself; any other reduction (argmax,
# quant_params, scatter_add's...) is timed as a sum of its class.
REDUCTION_OPS = ("layer_norm", "softmax", "log_softmax", "reduce_sum", "reduce_max")
# The largest difference a reduction schedule may make, relative to the result's scale
# (a sum's: the sum of |x|). Measured on float32 rows of 65 to 4099 elements (layer_norm,
# softmax, log_softmax, sums, means): at most 5e-7; `tests/test_loop_tuning.py` holds
# every candidate to this bound, 4x that.
REDUCTION_RTOL = 2e-6
_ELEMENTS = 1 << 16   # a representative kernel's work: GPT small's [128, 512] rows


def extent_class(n: int) -> int:
    return min(max(8, 1 << (max(n, 1) - 1).bit_length()), 1 << 16)


def _innermost(stmts) -> list[K.Loop]:
    loops = []
    for s in stmts:
        if isinstance(s, K.Loop):
            inner = _innermost(s.body)
            loops += inner or [s]
    return loops


def _exprs(e: K.Expr):
    yield e
    for child in vars(e).values():
        if isinstance(child, K.Expr):
            yield from _exprs(child)


def _vectorisable(loop: K.Loop) -> bool:
    """Whether LLVM can widen `loop`, told to (it prints a remark where it cannot): no
    libm call (float64 exp, tanh, erf, sigmoid) and every accumulator a plain fold
    (argmax's select-carried index is none)."""
    for s in loop.body:
        value = s.value if isinstance(s, (K.Store, K.Assign)) else None
        if value is None:
            return False
        if isinstance(s, K.Assign) and not (
                isinstance(value, K.Binary) and value.op in _FOLDS
                and isinstance(value.a, K.Var) and value.a.name == s.var.name):
            return False
        if any(isinstance(e, K.Unary) and e.op in _LIBM and e.dtype == "f64"
               for e in _exprs(value)):
            return False
    return True


# The costly unary ops: a loop computing them is compute bound, not memory bound, and
# may want another schedule (GPT's gelu, whose tanh is built on exp), so they are
# part of its class.
MATHS = ("exp", "tanh", "erf", "sigmoid", "log", "sin", "cos", "sqrt", "rsqrt")
_FOLDS = ("add", "mul", "max", "min")
_LIBM = ("exp", "tanh", "erf", "sigmoid")   # float64: libm calls, see codegen


def kernel_key(kernel: K.Kernel) -> tuple[str, tuple] | None:
    """(space, key) of `kernel`, or None where it has no schedule to choose (no loop, a
    dtype left to LLVM, an innermost loop LLVM cannot widen)."""
    loops = _innermost(kernel.body)
    outs = [b for b in kernel.buffers if not b.readonly]
    if not loops or not outs or outs[0].dtype not in TUNED_DTYPES \
            or not all(map(_vectorisable, loops)):
        return None
    extent = extent_class(max(lp.extent for lp in loops))
    dtype = outs[0].dtype
    # the streams: inputs of the result's type (a gather's indices, a mask, are not)
    inputs = sum(b.readonly and b.dtype == dtype for b in kernel.buffers)
    if any(isinstance(s, K.Assign) for lp in loops for s in lp.body):
        op = kernel.kind if kernel.kind in REDUCTION_OPS else "reduce_sum"
        return "reduction", (op, dtype, extent, inputs)
    maths = sorted({e.op for lp in loops for s in lp.body for e in _exprs(s.value)
                    if isinstance(e, K.Unary) and e.op in MATHS})
    return "elementwise", (dtype, extent, inputs, "+".join(maths))


def kernel_schedule(kernel: K.Kernel) -> dict:
    """The schedule `kernel` is generated with on this host."""
    found = kernel_key(kernel)
    return DEFAULT if found is None else tuning.schedule(*found)


def candidates(key) -> list[dict]:
    """The default first, then every width x interleave pair, the most lanes in flight
    first (width x interleave: independent accumulators hide the add latency, which is
    what the reductions gained here), then the wider."""
    pairs = sorted(((w, i) for w in WIDTHS for i in INTERLEAVES), key=lambda p: (
        -p[0] * p[1], -p[0]))
    return [dict(DEFAULT)] + [{"width": w, "interleave": i} for w, i in pairs]


# -- representative kernels ------------------------------------------------------------

def representative(space: str, key) -> K.Kernel:
    """A kernel of the class `key`: rows of the class's inner extent, `_ELEMENTS` in all
    (at least one row)."""
    if space == "elementwise":
        dtype, extent, inputs, maths = key
        op = "reduce_sum"
    else:
        op, dtype, extent, inputs = key
    rows = max(1, _ELEMENTS // extent)
    ins = [K.Buffer(f"b{i}", dtype) for i in range(max(inputs, 1))]
    out = K.Buffer(f"b{len(ins)}", dtype, readonly=False)
    r, j = K.Var("i1"), K.Var("i2")
    at = K.binary("add", K.binary("mul", r, K.const_index(extent)), j)
    x = K.Load(ins[0], at)
    if space == "elementwise":   # out = maths(in0 + in1 + ...)
        value = x
        for b in ins[1:]:
            value = K.binary("add", value, K.Load(b, at))
        for name in filter(None, maths.split("+")):
            arg = K.Unary("abs", value) if name in ("log", "sqrt", "rsqrt") else value
            value = K.Unary(name, arg) if dtype in K.FLOAT_DTYPES else value
        body = [K.Loop(j, extent, [K.Store(out, at, value)])]
        return K.Kernel(ins + [out], [K.Loop(r, rows, body, parallel=True)], kind="tune")
    return _reduction(op, dtype, extent, rows, ins, out, r, at, x)


def _reduction(op, dtype, extent, rows, ins, out, r, at, x) -> K.Kernel:
    """The kernel `lowering/rules/reduction.py` writes for `op` over rows, in short."""
    zero = K.Const(0.0 if dtype in K.FLOAT_DTYPES else 0, dtype)
    s, m = K.Var("s3", dtype), K.Var("s4", dtype)

    def loop(name, body):
        return K.Loop(K.Var(name), extent, body)
    j = at.b   # the inner loop's variable
    if op in ("reduce_sum", "reduce_max"):
        fold = "add" if op == "reduce_sum" else "max"
        init = zero if fold == "add" else K.Const(-math.inf, dtype) \
            if dtype in K.FLOAT_DTYPES else zero
        body = [K.Decl(s, init), K.Loop(j, extent, [K.Assign(s, K.binary(fold, s, x))]),
                K.Store(out, r, s)]
    elif op == "layer_norm":   # mean, variance, normalise (times weight, plus bias)
        d = K.binary("sub", x, m)
        y = K.binary("mul", d, s)
        if len(ins) > 1:
            y = K.binary("mul", y, K.Load(ins[1], j))
        if len(ins) > 2:
            y = K.binary("add", y, K.Load(ins[2], j))
        inv_n = K.Const(1.0 / extent, dtype)
        body = [K.Decl(s, zero), K.Loop(j, extent, [K.Assign(s, K.binary("add", s, x))]),
                K.Decl(m, K.binary("mul", s, inv_n)), K.Assign(s, zero),
                K.Loop(j, extent, [K.Assign(s, K.binary("add", s, K.binary("mul", d, d)))]),
                K.Assign(s, K.Unary("rsqrt", K.binary("add", K.binary("mul", s, inv_n),
                                                       K.Const(1e-5, dtype)))),
                K.Loop(j, extent, [K.Store(out, at, y)])]
    else:   # softmax, log_softmax: max, sum of exps, write
        e = K.Unary("exp", K.binary("sub", x, m))
        body = [K.Decl(m, K.Const(-math.inf, dtype)),
                K.Loop(j, extent, [K.Assign(m, K.binary("max", m, x))]),
                K.Decl(s, zero), K.Loop(j, extent, [K.Assign(s, K.binary("add", s, e))]),
                K.Loop(j, extent, [K.Store(out, at, K.binary("div", e, s))])]
    return K.Kernel(ins + [out], [K.Loop(r, rows, body, parallel=True)], kind="tune")


def random_inputs(kernel: K.Kernel, elements: dict, seed: int = 0) -> list[np.ndarray]:
    """Arrays for `kernel`'s buffers (`elements`: buffer name -> size), random inputs
    in [-2, 2) (small integers for integer dtypes) and zeroed outputs."""
    rng = np.random.default_rng(seed)
    arrays = []
    for b in kernel.buffers:
        dtype, n = DTYPES[b.dtype], elements[b.name]
        if not b.readonly:
            arrays.append(np.zeros(n, dtype))
        elif np.issubdtype(dtype, np.floating):
            arrays.append(rng.uniform(-2, 2, n).astype(dtype))
        else:
            arrays.append(rng.integers(0, 8, n).astype(dtype))
    return arrays


def run_kernel(kernel: K.Kernel, schedule: dict, arrays: list[np.ndarray], repeat: int = 1
               ) -> float:
    """Run `kernel` compiled with `schedule` on `arrays` (in place, one thread) `repeat`
    times; the median seconds of one call."""
    module = codegen.new_module()
    codegen.add_kernel(module, kernel, schedule)
    fn = jit.cfunc(jit.compile_ir(str(module), [kernel.name])[kernel.name], None,
                   [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64])
    args = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    extent = kernel.parallel_extent
    times = []
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        fn(args, 0, extent)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sizes(space: str, key) -> dict:
    extent, inputs = key[1:3] if space == "elementwise" else key[2:4]
    rows = max(1, _ELEMENTS // extent)
    inputs = max(inputs, 1)
    sizes = {f"b{i}": rows * extent for i in range(inputs + 1)}
    if space == "reduction":
        if key[0] == "layer_norm":
            sizes.update({"b1": extent, "b2": extent})
        if key[0] in ("reduce_sum", "reduce_max"):
            sizes[f"b{inputs}"] = rows
    return sizes


_inputs: dict = {}   # (space, key) -> arrays: one random draw per key


def measurer(space: str):
    def measure(key, schedule: dict, repeat: int) -> float:
        kernel = representative(space, key)
        if (space, key) not in _inputs:
            _inputs[(space, key)] = random_inputs(kernel, _sizes(space, key))
        return run_kernel(kernel, schedule, _inputs[(space, key)], repeat)
    return measure


for _space in ("elementwise", "reduction"):
    tuning.register(tuning.Space(_space, lambda key: dict(DEFAULT), candidates,
                                 measurer(_space)))
